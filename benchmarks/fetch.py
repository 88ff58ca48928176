"""Fetch throughput from an S3 gateway on loopback (issue 3): `python -m benchmarks.fetch`.

Options: `[--size-mib 1024] [--runs 3] [--warmup 1] [--check] [--out PATH]`.

Starts a JuiceFS S3 gateway on 127.0.0.1 (`tests.s3server`) in a temporary folder, uploads a
random object of `--size-mib`, then times four ways of getting it into a new local file:

- `wmtp`: `wmtp.fetch.fetch` into a fresh cache folder (parallel ranged GETs with If-Match,
  streamed into the file, fsync, atomic rename: what a load pays for a file its metadata's
  manifest does not list);
- `wmtp + sha256`: the same with a manifest entry for the file, so it is also hashed on the
  way and checked (what a load pays for a file `wmtp.save` wrote);
- `boto3`: the old loader's `download_file` with `TransferConfig(multipart_chunksize=25 MiB,
  max_concurrency=10)` (no hash, no fsync);
- `local copy`: `shutil.copyfile` of the source file, the ceiling: it writes a new file like the
  others, from memory (the source sits in the page cache, or on tmpfs), with no HTTP.

Every round runs each method once, the order rotating from round to round, so noise and
first-in-round effects hit all alike. Untimed `--warmup` rounds come first: they fill the
gateway's block cache (else the first method of the first round alone reads cold blocks) and
the client's allocator and connection pools. Every download is checked (size and sha256 of the
source) outside the timed part, then deleted.

Disk use stays near three times the object: the gateway's store, its read cache (the gateway
keeps blocks it serves, up to the whole object) and one download. The source goes to
`/dev/shm` when that has room (a RAM file reads like a page-cached one), else next to the rest
(then four times).

Reported per method: median wall seconds, MiB/s, throughput ratios against boto3 and the local
copy, and median CPU seconds of this process and of the gateway. On a small machine the
gateway and the client share the cores, so a client's CPU cost turns into wall time, and CPU
seconds move less than wall seconds when other work runs beside the benchmark.

Prints a Markdown table (stdout) and writes JSON (`benchmarks/results/fetch.json`). The target
is wmtp >= 1.3x boto3 (median seconds). The exit status is 0, it is a report, unless `--check`:
then 1 when wmtp / boto3 < 1.3 / 1.2 (~1.08), a 20% margin for a noisy shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

# Guards before any client exists: nothing may ask a cloud metadata service for credentials
# (every client here has explicit keys); with these a slip fails on loopback.
os.environ["AWS_METADATA_ENDPOINT"] = "http://127.0.0.1:9"  # obstore
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore

import boto3  # type: ignore[import-untyped]
import msgspec
import obstore
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from tests.s3server import (
    REGION,
    S3Server,
    make_store,
    start_gateway,
    stop_gateway,
    storage_options,
)
from wmtp.fetch import fetch
from wmtp.metadata import FileEntry

MIB: Final = 2**20
KEY_PREFIX: Final = "bench"
NAME: Final = "blob.bin"
TARGET: Final = 1.3  # wmtp at least 1.3x as fast as boto3 (issue 3)
MARGIN: Final = 1.2  # --check fails only under TARGET / MARGIN
BOTO3_CHUNK: Final = 25 * MIB  # the old loader's TransferConfig
BOTO3_CONCURRENCY: Final = 10
METHODS: Final = ("wmtp", "wmtp + sha256", "boto3", "local copy")
WRITE_CHUNK: Final = 8 * MIB
UPLOAD_PART: Final = 64 * MIB  # JuiceFS's chunk size
SHM: Final = Path("/dev/shm")
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results" / "fetch.json"


class Sample(msgspec.Struct, frozen=True):
    """One timed run: wall seconds, CPU seconds of this process and of the gateway."""

    wall_s: float
    client_cpu_s: float
    gateway_cpu_s: float | None  # None where /proc is not available


class MethodResult(msgspec.Struct, frozen=True):
    """One method's runs (in round order), medians, throughput and ratios."""

    method: str
    samples: list[Sample]
    median_s: float
    mib_per_s: float
    vs_boto3: float  # boto3's median seconds / this one's: > 1 is faster than boto3
    vs_local_copy: float  # the local copy's median seconds / this one's: the share of the ceiling
    client_cpu_s: float
    gateway_cpu_s: float | None


class Report(msgspec.Struct, frozen=True):
    """The JSON written to `--out`."""

    size_mib: int
    runs: int
    warmup: int
    results: list[MethodResult]
    target: float
    margin: float
    wmtp_vs_boto3: float
    target_met: bool
    check_passed: bool
    boto3_config: dict[str, int]
    wmtp_config: dict[str, int]
    source_on: str
    load_average: dict[str, list[float]]  # before and after: other work on the machine
    machine: dict[str, Any]
    date: str


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fetch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="object size (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when wmtp/boto3 < {TARGET} / {MARGIN} (the target with a margin)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--size-mib and --runs must be at least 1, --warmup at least 0")
    return args


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def source_dir(size: int, fallback: Path) -> Path:
    """Where the source file goes: tmpfs when it has room for twice the object, else disk."""
    try:
        if SHM.is_dir() and shutil.disk_usage(SHM).free >= 2 * size:
            return SHM
    except OSError:
        pass
    return fallback


def write_random(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` (random so no layer can compress); their sha256."""
    sha = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(WRITE_CHUNK, left))
            sha.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return sha.hexdigest()


def verify(path: Path, size: int, sha256: str, method: str) -> None:
    """Raise if a downloaded file is not the source (a fast wrong download is no result)."""
    if (got := path.stat().st_size) != size:
        raise RuntimeError(f"{method}: {path} has {got} bytes, the source {size}")
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{method}: {path} has sha256 {digest}, the source {sha256}")


def boto3_client(server: S3Server) -> Any:
    """A boto3 S3 client for the gateway, path-style (the bucket is not a DNS name here)."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}),
    )


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(action: Callable[[], Path], gateway_pid: int) -> tuple[Sample, Path]:
    """Run `action` and measure it; the file it produced."""
    gateway_before = process_cpu_s(gateway_pid)
    cpu_before = time.process_time()
    start = time.perf_counter()
    path = action()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    gateway_after = process_cpu_s(gateway_pid)
    gateway = (
        None if gateway_before is None or gateway_after is None else gateway_after - gateway_before
    )
    return Sample(wall_s=wall, client_cpu_s=cpu, gateway_cpu_s=gateway), path


def run_wmtp(
    url: str, options: dict[str, str], cache: Path, manifest: dict[str, FileEntry] | None = None
) -> Callable[[], Path]:
    """wmtp's fetch into `cache`, which must be new (a used one would download nothing);
    with a manifest entry, the download is also hashed and checked as it is written."""

    def action() -> Path:
        return fetch(
            url,
            [NAME],
            storage_options=options,
            cache_dir=cache,
            progress=False,
            manifest=manifest,
        )[NAME]

    return action


def run_boto3(client: Any, bucket: str, key: str, dest: Path) -> Callable[[], Path]:
    """The old loader's download: boto3's managed transfer, 25 MiB parts, 10 threads."""
    config = TransferConfig(multipart_chunksize=BOTO3_CHUNK, max_concurrency=BOTO3_CONCURRENCY)

    def action() -> Path:
        client.download_file(bucket, key, str(dest), Config=config)
        return dest

    return action


def run_copy(source: Path, dest: Path) -> Callable[[], Path]:
    """The ceiling: copy the source file (memory to a new file, no network)."""

    def action() -> Path:
        shutil.copyfile(source, dest)
        return dest

    return action


def rotated(round_no: int) -> tuple[str, ...]:
    """The methods in round `round_no`'s order: each one goes first in turn."""
    shift = round_no % len(METHODS)
    return METHODS[shift:] + METHODS[:shift]


def one_round(
    round_no: int, server: S3Server, client: Any, source: Path, sha256: str, scratch: Path
) -> dict[str, Sample]:
    """Time every method once, check and delete each download outside the timing.

    `round_no` counts warm-up rounds too; it sets the order and names the folders.
    """
    size = source.stat().st_size
    # Everything a run writes goes into a folder of its own, removed after the run.
    folders = {method: scratch / f"{round_no}-{i}" for i, method in enumerate(METHODS)}
    for folder in folders.values():
        folder.mkdir()
    actions = {
        "wmtp": run_wmtp(
            f"s3://{server.bucket}/{KEY_PREFIX}", storage_options(server), folders["wmtp"]
        ),
        "wmtp + sha256": run_wmtp(
            f"s3://{server.bucket}/{KEY_PREFIX}",
            storage_options(server),
            folders["wmtp + sha256"],
            {NAME: FileEntry(size=size, sha256=sha256)},
        ),
        "boto3": run_boto3(client, server.bucket, f"{KEY_PREFIX}/{NAME}", folders["boto3"] / NAME),
        "local copy": run_copy(source, folders["local copy"] / NAME),
    }
    samples = {}
    for method in rotated(round_no):
        sample, path = timed(actions[method], server.pid)
        try:
            verify(path, size, sha256, method)
        finally:
            shutil.rmtree(folders[method])
        samples[method] = sample
        progress(
            f"round {round_no} {method:<10} {sample.wall_s:6.2f} s "
            f"(cpu {sample.client_cpu_s:.2f} s, gateway {sample.gateway_cpu_s or 0:.2f} s)"
        )
    return samples


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median, or None when any value is missing."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def summarise(samples: dict[str, list[Sample]], size: int) -> list[MethodResult]:
    """Medians, MiB/s and throughput ratios per method."""
    medians = {m: statistics.median(s.wall_s for s in samples[m]) for m in METHODS}
    return [
        MethodResult(
            method=method,
            samples=samples[method],
            median_s=medians[method],
            mib_per_s=size / MIB / medians[method],
            vs_boto3=medians["boto3"] / medians[method],
            vs_local_copy=medians["local copy"] / medians[method],
            client_cpu_s=statistics.median(s.client_cpu_s for s in samples[method]),
            gateway_cpu_s=median_or_none([s.gateway_cpu_s for s in samples[method]]),
        )
        for method in METHODS
    ]


def table(results: Sequence[MethodResult], wmtp_vs_boto3: float) -> str:
    """The Markdown report: one row per method, and the target's verdict."""
    lines = [
        "| method | median s | MiB/s | vs boto3 | vs local copy | client CPU s | gateway CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gateway = "n/a" if r.gateway_cpu_s is None else f"{r.gateway_cpu_s:.2f}"
        lines.append(
            f"| {r.method} | {r.median_s:.2f} | {r.mib_per_s:.0f} | {r.vs_boto3:.2f}x "
            f"| {r.vs_local_copy:.2f}x | {r.client_cpu_s:.2f} | {gateway} |"
        )
    met = "met" if wmtp_vs_boto3 >= TARGET else "missed"
    lines += ["", f"target wmtp >= {TARGET}x boto3: {met} ({wmtp_vs_boto3:.2f}x)"]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "boto3": boto3.__version__,
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work running beside the benchmark)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure(
    size_mib: int, runs: int, warmup: int, workdir: Path, source: Path
) -> dict[str, list[Sample]]:
    """Start the gateway in `workdir`, upload the object, run the rounds; stop the gateway."""
    progress(f"writing {size_mib} MiB of random bytes to {source}")
    sha256 = write_random(source, size_mib * MIB)
    scratch = workdir / "scratch"
    scratch.mkdir()
    server = start_gateway(workdir / "s3")
    try:
        progress(f"gateway at {server.endpoint}; uploading")
        # A multipart upload streamed from the file, in parts of one JuiceFS chunk: smaller
        # parts leave slices the gateway compacts on the first reads (CPU in a timed run,
        # and half the object again on disk).
        store = make_store(server, KEY_PREFIX)
        obstore.put(store, NAME, source, chunk_size=UPLOAD_PART, max_concurrency=4)
        client = boto3_client(server)
        samples: dict[str, list[Sample]] = {method: [] for method in METHODS}
        if warmup:
            progress(f"the first {warmup} round(s) warm up and are not counted")
        for round_no in range(warmup + runs):
            got = one_round(round_no, server, client, source, sha256, scratch)
            if round_no >= warmup:
                for method, sample in got.items():
                    samples[method].append(sample)
        return samples
    finally:
        stop_gateway(server)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the JSON; the exit status (see the module doc)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    size = args.size_mib * MIB
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="wmtp-fetch-bench-") as tmp:
        where = source_dir(size, Path(tmp))
        with tempfile.TemporaryDirectory(prefix="wmtp-fetch-source-", dir=where) as src:
            samples = measure(args.size_mib, args.runs, args.warmup, Path(tmp), Path(src) / NAME)
    # The module itself: as an attribute of the package, `wmtp.fetch` may be the function.
    fetch_module = sys.modules["wmtp.fetch"]
    results = summarise(samples, size)
    ratio = results[METHODS.index("wmtp")].vs_boto3
    report = Report(
        size_mib=args.size_mib,
        runs=args.runs,
        warmup=args.warmup,
        results=results,
        target=TARGET,
        margin=MARGIN,
        wmtp_vs_boto3=ratio,
        target_met=ratio >= TARGET,
        check_passed=ratio >= TARGET / MARGIN,
        boto3_config={"multipart_chunksize": BOTO3_CHUNK, "max_concurrency": BOTO3_CONCURRENCY},
        wmtp_config={"PART_SIZE": fetch_module.PART_SIZE, "PARALLEL": fetch_module.PARALLEL},
        source_on=str(where),
        load_average={"before": load_before, "after": load_average()},
        machine=machine(),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    print(table(results, ratio))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    progress(f"wrote {args.out}")
    if args.check and not report.check_passed:
        limit = TARGET / MARGIN
        print(f"FAIL: wmtp/boto3 {ratio:.2f} < {TARGET}/{MARGIN} = {limit:.2f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

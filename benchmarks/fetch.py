"""S3 fetch throughput against boto3: `python -m benchmarks.fetch [--quick] [--check]`.

A JuiceFS S3 gateway on 127.0.0.1 (`tests.s3server`) serves a random object. Each round
times `wmtp.store.fetch` (without and with a manifest entry, which hashes the parts as they
land), the old loader's boto3 `download_file` and a local copy (the ceiling), the order
rotating; every download is checked outside the timing. Target: the hashed fetch, the path of
every model `wmtp.save` wrote, >= 1.0x boto3 (which neither hashes nor fsyncs); `--check`
exits 1 past it by more than the harness' noise margin. `--quick` (CI): 256 MiB, 3 rounds.
Writes `results/fetch.json` (quick: `results/fetch-quick.json`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

# Before any client exists: every client here has explicit keys, so nothing may ask a cloud
# metadata service for credentials; with these a slip fails on loopback.
os.environ["AWS_METADATA_ENDPOINT"] = "http://127.0.0.1:9"  # obstore
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore

import boto3  # type: ignore[import-untyped]
import msgspec
import obstore
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from benchmarks import harness
from benchmarks.harness import MIB
from tests.s3server import REGION, S3Server, make_store, start_gateway, stop_gateway
from tests.s3server import storage_options as options_of
from wmtp.metadata import FileEntry
from wmtp.store import fetch

NAME: Final = "blob.bin"
PREFIX: Final = "bench"
TARGET: Final = 1.0  # the hashed fetch against boto3's download
BOTO3: Final = TransferConfig(multipart_chunksize=25 * MIB, max_concurrency=10)


class Sample(msgspec.Struct, frozen=True):
    """One timed download: wall seconds, CPU seconds of this process and of the gateway."""

    wall_s: float
    client_cpu_s: float
    gateway_cpu_s: float | None  # None where /proc is not available


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(download: Callable[[Path], Path], scratch: Path, server: S3Server, sha256: str) -> Sample:
    """Time one download into a new folder, then check it against the source and delete it."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    gateway, cpu, start = cpu_s(server.pid), time.process_time(), time.perf_counter()
    path = download(folder)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = cpu_s(server.pid)
    try:
        with path.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                raise RuntimeError(f"{path}: not the source object")
    finally:
        shutil.rmtree(folder)
    return Sample(wall, cpu, None if gateway is None or after is None else after - gateway)


def downloads(server: S3Server, source: Path, sha256: str) -> dict[str, Callable[[Path], Path]]:
    """Each method as a function of an empty folder, returning the file it wrote."""
    url, options = f"s3://{server.bucket}/{PREFIX}", options_of(server)
    manifest = {NAME: FileEntry(size=source.stat().st_size, sha256=sha256)}
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}),  # the bucket is no DNS name here
    )

    def wmtp(folder: Path, listed: dict[str, FileEntry] | None = None) -> Path:
        got = fetch(
            url, [NAME], storage_options=options, cache_dir=folder, progress=False, manifest=listed
        )
        return got[NAME]

    def old(folder: Path) -> Path:
        client.download_file(server.bucket, f"{PREFIX}/{NAME}", str(folder / NAME), Config=BOTO3)
        return folder / NAME

    def copy(folder: Path) -> Path:
        return Path(shutil.copyfile(source, folder / NAME))

    hashed = functools.partial(wmtp, listed=manifest)
    return {"wmtp": wmtp, "wmtp + sha256": hashed, "boto3": old, "local copy": copy}


def write_random(path: Path, size: int) -> str:
    """`size` random bytes (no layer can compress them) into `path`; their sha256."""
    sha = hashlib.sha256()
    with path.open("wb") as out:
        for at in range(0, size, 8 * MIB):
            chunk = os.urandom(min(8 * MIB, size - at))
            sha.update(chunk)
            out.write(chunk)
    return sha.hexdigest()


def measure(size_mib: int, runs: int, warmup: int, work: Path) -> dict[str, list[Sample]]:
    """Start the gateway in `work`, upload the object, run the rounds, stop the gateway."""
    # The source on tmpfs when it has room (a RAM file reads like a page-cached one).
    shm = Path("/dev/shm")
    room = shm.is_dir() and shutil.disk_usage(shm).free > 2 * size_mib * MIB
    source_dir = Path(tempfile.mkdtemp(dir=shm if room else work))
    try:
        source = source_dir / NAME
        sha256 = write_random(source, size_mib * MIB)
        server = start_gateway(work / "s3")
        try:
            store = make_store(server, PREFIX)
            obstore.put(store, NAME, source, chunk_size=64 * MIB, max_concurrency=4)
            jobs = {
                name: functools.partial(timed, download, work, server, sha256)
                for name, download in downloads(server, source, sha256).items()
            }
            return harness.interleave(jobs, runs, warmup)
        finally:
            stop_gateway(server)
    finally:
        shutil.rmtree(source_dir)


def rows(samples: dict[str, list[Sample]], size_mib: int) -> list[tuple[Any, ...]]:
    """Per method: median s, MiB/s, ratios to boto3 and the copy, median CPU seconds."""
    wall = {m: harness.median(s.wall_s for s in v) or 0.0 for m, v in samples.items()}
    return [
        (
            m,
            wall[m],
            size_mib / wall[m],
            harness.ratio(wall["boto3"], wall[m]),
            harness.ratio(wall["local copy"], wall[m]),
            harness.median(s.client_cpu_s for s in v),
            harness.median(s.gateway_cpu_s for s in v),
        )
        for m, v in samples.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write `results/fetch.json`; the exit status (see above)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fetch", description=__doc__)
    parser.add_argument("--size-mib", type=int, help="object size (1024, quick 256)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--check", action="store_true", help="exit 1 past the target's limit")
    parser.add_argument("--quick", action="store_true", help="CI: 256 MiB, and --check")
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="wmtp-fetch-bench-") as work:
        samples = measure(args.size_mib, args.runs, args.warmup, Path(work))
    table = rows(samples, args.size_mib)
    hashed = table[1][3]  # boto3's time over the hashed fetch's
    what = "hashed wmtp fetch / boto3, throughput"
    found = harness.target("-", what, hashed, TARGET, at_least=True)
    header = ["method", "median s", "MiB/s", "vs boto3", "vs local copy", "client CPU s"]
    print(harness.table([*header, "gateway CPU s"], table, left=1))
    print(f"\ntarget {what} >= {TARGET}: {found.status} ({harness.fmt(hashed)}x)")
    record = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "warmup": args.warmup,
        "samples": samples,
        "target": found,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": f"{os.cpu_count()} CPUs, boto3 {boto3.__version__}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    name = "fetch-quick.json" if args.quick else "fetch.json"
    harness.progress(f"wrote {harness.write_json(harness.RESULTS / name, record)}")
    return int((args.check or args.quick) and found.status in ("FAIL", "not measured"))


if __name__ == "__main__":
    sys.exit(main())

"""One measurement in a fresh process: `python -m benchmarks.child MODE FOLDER`.

Prints one JSON line (a `ChildResult`). Libraries (torch, transformers, the model's modeling
module, safetensors, wmtp) are imported before the clock starts, except in the `e2e-*` modes,
which import everything inside the measured part and are timed by the parent from spawn.
Weights are checked against the files after the clock stops, and peak RSS is read before the
check, so neither the check nor its reads count.
"""

from __future__ import annotations

import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from benchmarks import methods

if TYPE_CHECKING:
    import torch


class ChildResult(msgspec.Struct, frozen=True):
    """What one child measured. Times in seconds, resident memory in MiB."""

    mode: str
    load_s: float = 0.0  # the loading call until it returns
    after_s: float = 0.0  # what follows: touching every weight, or the first forward pass
    rss_start_mb: float = 0.0  # peak RSS before the clock starts (libraries imported)
    rss_load_mb: float = 0.0  # peak RSS when the loading call returned
    rss_peak_mb: float = 0.0  # peak RSS at the end of the measured part
    wall_end: float = 0.0  # time.time() at the end of the measured part, for e2e timing
    problems: list[str] = []
    error: str = ""
    unavailable: bool = False  # wmtp.load does not exist yet


Loader = Callable[[Path], "torch.nn.Module"]

LOADERS: Final[dict[str, Loader]] = {
    "wmtp": lambda folder: methods.wmtp_load(folder, None),
    "wmtp-bf16": lambda folder: methods.wmtp_load(folder, "bfloat16"),
    "wmtp-forward": lambda folder: methods.wmtp_load(folder, None),
    "old": methods.old_load,
    "hf": methods.hf_load,
    "hf-forward": methods.hf_load,
    "e2e-wmtp": lambda folder: methods.wmtp_load(folder, None),
    "e2e-old": methods.old_load,
}
FLOORS: Final[dict[str, Callable[[Path], int]]] = {
    "floor-read": methods.floor_read,
    "floor-mmap": methods.floor_mmap,
}
MODES: Final = (*FLOORS, *LOADERS)


def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far, in MiB.

    `VmHWM` rather than `getrusage().ru_maxrss`: Linux folds the parent's peak into a child's
    `ru_maxrss` when the child (vforked) calls exec, so a parent that once held a 1 GB tensor
    would lift every child's figure. `VmHWM` belongs to the memory map exec created.
    """
    with Path("/proc/self/status").open() as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_floor(mode: str, folder: Path) -> ChildResult:
    """Time a floor: no library is imported, as reading bytes needs none."""
    start_rss = peak_rss_mb()
    t0 = time.perf_counter()
    FLOORS[mode](folder)
    elapsed = time.perf_counter() - t0
    rss = peak_rss_mb()
    return ChildResult(
        mode,
        load_s=elapsed,
        rss_start_mb=start_rss,
        rss_load_mb=rss,
        rss_peak_mb=rss,
        wall_end=time.time(),
    )


def measure_load(mode: str, folder: Path) -> ChildResult:
    """Time a loading method, then touch the weights (or run a forward pass), then check."""
    e2e = mode.startswith("e2e-")
    if not e2e:
        methods.import_libraries(folder)
        if "wmtp" in mode:
            methods.import_wmtp()
    start_rss = peak_rss_mb()
    t0 = time.perf_counter()
    model = LOADERS[mode](folder)
    t1 = time.perf_counter()
    load_rss = peak_rss_mb()
    if mode.endswith("-forward"):
        methods.forward_once(model)
    else:
        methods.touch(model)
    t2 = time.perf_counter()
    wall_end = time.time()
    peak = peak_rss_mb()
    dtype = "bfloat16" if mode.endswith("-bf16") else None
    return ChildResult(
        mode,
        load_s=t1 - t0,
        after_s=t2 - t1,
        rss_start_mb=start_rss,
        rss_load_mb=load_rss,
        rss_peak_mb=peak,
        wall_end=wall_end,
        problems=methods.verify(model, folder, dtype),
    )


def measure(mode: str, folder: Path) -> ChildResult:
    """Run `mode` on `folder`, turning any failure into a result that says what went wrong."""
    try:
        if mode in FLOORS:
            return measure_floor(mode, folder)
        return measure_load(mode, folder)
    except methods.WmtpUnavailableError as e:
        return ChildResult(mode, error=str(e), unavailable=True)
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        return ChildResult(mode, error=f"{e!r} at {last.filename}:{last.lineno}")


def main(argv: list[str]) -> int:
    """Entry point: `MODE FOLDER`; prints the result as one JSON line."""
    if len(argv) != 2 or argv[0] not in MODES:
        print(f"usage: python -m benchmarks.child {{{','.join(MODES)}}} FOLDER", file=sys.stderr)
        return 2
    result = measure(argv[0], Path(argv[1]))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

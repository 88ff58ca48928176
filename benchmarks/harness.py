"""Spawning measurement children and collecting what they report (parent side)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import msgspec

from benchmarks.child import ChildResult
from benchmarks.models import REPO

# Children must never reach the network, and progress bars would only pollute stderr.
QUIET_ENV: Final = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


class Sample(msgspec.Struct, frozen=True):
    """One child's result, with the wall time from spawn to the end of its measured part."""

    model: str
    result: ChildResult
    spawn_to_end_s: float


def child_env() -> dict[str, str]:
    """The environment of a child: this one, quiet and offline, with the repository importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **QUIET_ENV, "PYTHONPATH": path}


def parse_child(mode: str, completed: subprocess.CompletedProcess[str]) -> ChildResult:
    """The child's JSON line, or a result holding the reason there is none."""
    lines = completed.stdout.strip().splitlines()
    if completed.returncode == 0 and lines:
        try:
            return msgspec.json.decode(lines[-1], type=ChildResult)
        except msgspec.DecodeError:
            pass
    tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
    return ChildResult(mode, error=f"child exited {completed.returncode}: {tail}")


def spawn(mode: str, folder: Path) -> tuple[ChildResult, float]:
    """Run one child; its result and the wall time from spawn to the end of its measurement."""
    start = time.time()
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", mode, str(folder)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    result = parse_child(mode, completed)
    return result, (result.wall_end - start if result.wall_end else 0.0)


def measure_model(
    model: str,
    folder: Path,
    modes: Sequence[str],
    runs: int,
    progress: Callable[[str], None],
) -> list[Sample]:
    """`runs` fresh-process samples of every mode on `folder`, modes interleaved run by run.

    Interleaving spreads slow drifts of a noisy machine over all methods alike.
    """
    samples: list[Sample] = []
    for run in range(1, runs + 1):
        for mode in modes:
            result, spawn_to_end = spawn(mode, folder)
            samples.append(Sample(model, result, spawn_to_end))
            shown = result.error or f"{result.load_s + result.after_s:.3f} s"
            progress(f"{model}: run {run}/{runs} {mode}: {shown}")
            if result.unavailable:
                # Every later run would say the same; do not spend minutes repeating it.
                modes = [m for m in modes if m != mode]
    return samples


def interpreter_seconds(code: str) -> float:
    """Wall time of `python -c code` in a fresh interpreter, from spawn to exit."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), check=True, capture_output=True
    )
    return time.perf_counter() - start


def import_times(runs: int) -> tuple[list[float], list[float], str]:
    """Seconds for `python -c "pass"` and `python -c "import wmtp"`, interleaved; and an error."""
    bare: list[float] = []
    with_wmtp: list[float] = []
    for _ in range(runs):
        bare.append(interpreter_seconds("pass"))
        try:
            with_wmtp.append(interpreter_seconds("import wmtp"))
        except subprocess.CalledProcessError as e:
            return bare, [], f"`python -c 'import wmtp'` failed with exit {e.returncode}"
    return bare, with_wmtp, ""

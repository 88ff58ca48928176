"""Run the load benchmark: `python -m benchmarks.run [--quick] [--sizes NAME ...]`.

Generates the models (random weights, in a temporary folder unless `--workdir`), measures
every method in fresh processes, prints a Markdown report, writes `benchmarks/results/<mode>.
{json,md,png}`, and exits 1 when a target is missed past its margin (see `benchmarks.checks`),
a method errors, or a loaded model has wrong weights.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchmarks import checks, harness, lines, report, summary
from benchmarks.layout import warm_page_cache
from benchmarks.models import HERE, REPO, SPECS, Generated, ModelSpec, ensure_model

QUICK_SIZES: Final = ("small", "hf-small")
FULL_SIZES: Final = ("small", "198m", "198m-sharded", "1b", "hf-distilgpt2")
MTP_MODES: Final = ("floor-read", "floor-mmap", "wmtp", "wmtp-bf16", "old")
HF_QUICK_MODES: Final = ("floor-read", "floor-mmap", "wmtp", "hf")
HF_FULL_MODES: Final = (*HF_QUICK_MODES, "old", "wmtp-forward", "hf-forward")
E2E_MODES: Final = ("e2e-wmtp", "e2e-old")
E2E_PREFERRED: Final = "198m"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI mode: {', '.join(QUICK_SIZES)}, 3 runs, no end-to-end rows",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted(SPECS),
        metavar="NAME",
        help=f"models to measure, of {', '.join(SPECS)}",
    )
    parser.add_argument("--runs", type=int, help="runs per method (default 5, quick 3)")
    parser.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        help="measure end to end in a fresh process (default: not in quick)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep generated models here and reuse them (default: a temp dir)",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results", help="where to write <mode>.json/.md/.png"
    )
    return parser.parse_args(argv)


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def modes_for(spec: ModelSpec, quick: bool, e2e: bool) -> tuple[str, ...]:
    """What to measure on a model."""
    if spec.family == "hf":
        return HF_QUICK_MODES if quick else HF_FULL_MODES
    return MTP_MODES + (E2E_MODES if e2e else ())


def e2e_model(sizes: Sequence[str]) -> str | None:
    """The model measured end to end: the 198M one if selected, else the first MTP model."""
    mtp = [s for s in sizes if SPECS[s].family == "mtp"]
    return E2E_PREFERRED if E2E_PREFERRED in mtp else (mtp[0] if mtp else None)


def wmtp_status() -> str:
    """'' if `wmtp.load` exists, else why not (checked in a child, as the package may change)."""
    done = subprocess.run(
        [sys.executable, "-c", "import wmtp; assert callable(wmtp.load)"],
        cwd=REPO,
        env=harness.child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return ""
    return "wmtp.load not available: " + (done.stderr.strip().splitlines() or ["?"])[-1]


def machine() -> dict[str, str]:
    """Versions and hardware, for the record."""
    import safetensors
    import torch
    import transformers

    facts = {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "safetensors": str(safetensors.__version__),
        "platform": platform.platform(),
    }
    facts["summary"] = (
        f"{facts['cpus']} CPUs, Python {facts['python']}, torch {facts['torch']}, "
        f"transformers {facts['transformers']}, safetensors {facts['safetensors']}"
    )
    return facts


def notes(runs: int, modeling: str) -> list[str]:
    """How to read the figures."""
    return [
        f"Median of {runs} runs per method, each in a fresh process, methods interleaved.",
        "Timed from after `import torch, transformers, safetensors.torch` and the model's "
        "transformers modeling module (`transformers.models.gpt2.modeling_gpt2`, ~2 s on "
        "transformers 5 here): library import, the same for every method, so left out. "
        "`import wmtp` is measured separately; end-to-end rows include everything from spawn.",
        "Warm page cache: every file is read once before a model's runs; caches are not dropped.",
        "The kernel keeps cached files partly in large folios mapped 2 MiB at a time, so "
        "touching a map (the mmap floor, and weights that `wmtp.load` maps) is cheap and varies "
        "with how the cache was filled; reading into a buffer is the stable floor for ratios.",
        "touch = read one element per 4 KiB page of every weight, so lazily mapped weights are "
        "resident; 'until it returns' rows are the same processes stopped at the return.",
        "Old method: the model class built with random init, `safetensors.torch.load_file`, "
        "`load_state_dict(strict=False)` copying into it (shards: `load_file` per shard).",
        "Every loaded model is compared tensor by tensor with the files after the clock stops; "
        "RSS is read before that check. added RSS = peak minus RSS when the clock started.",
        f"MTP models use `{modeling}` as `modeling.py`.",
    ]


def generate(sizes: Sequence[str], root: Path) -> list[Generated]:
    """The model folders of `sizes` under `root` (reused when already generated there)."""
    generated = []
    for name in sizes:
        start = time.perf_counter()
        model = ensure_model(SPECS[name], root)
        progress(
            f"model {name}: {model.parameters / 1e6:.1f}M params, "
            f"{model.weight_bytes / 2**20:,.0f} MiB ({time.perf_counter() - start:.1f} s)"
        )
        generated.append(model)
    return generated


def measure(models: Sequence[Generated], quick: bool, e2e: bool, runs: int) -> list[harness.Sample]:
    """Every method's samples on every model, page cache warmed per model."""
    e2e_name = e2e_model([m.spec.name for m in models]) if e2e else None
    samples: list[harness.Sample] = []
    for model in models:
        folder = Path(model.folder)
        warm_page_cache(folder)
        modes = modes_for(model.spec, quick, model.spec.name == e2e_name)
        samples += harness.measure_model(model.spec.name, folder, modes, runs, progress)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every target holds within its margin."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = "quick" if args.quick else "full"
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    runs = args.runs or (3 if args.quick else 5)
    e2e = not args.quick if args.e2e is None else args.e2e
    if status := wmtp_status():
        progress(f"{status}; its methods will be reported as not measured")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    try:
        models = generate(sizes, root)
        samples = measure(models, args.quick, e2e, runs)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    bare, with_wmtp, import_error = harness.import_times(max(runs, 5))
    imports = summary.import_row(bare, with_wmtp, import_error)
    rows = summary.summarise(models, samples)
    counts = lines.count_package(REPO / "wmtp")
    found = [*checks.all_checks(rows, imports, sizes), checks.lines_check(counts)]
    modeling = next((m.modeling_source for m in models if m.modeling_source), "-")
    result = report.Report(
        mode=mode,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=shlex.join(["python", "-m", "benchmarks.run", *(argv or sys.argv[1:])]),
        machine=machine(),
        runs=runs,
        notes=notes(runs, modeling),
        models=list(models),
        rows=rows,
        imports=imports,
        checks=found,
        lines=counts,
        failures=checks.failures(found, rows),
        samples=samples,
    )
    text = report.markdown(result)
    print(text)
    for path in report.write_outputs(result, text, args.out):
        progress(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if result.failures:
        progress(f"FAILED: {len(result.failures)} problem(s); see 'Failures' above")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

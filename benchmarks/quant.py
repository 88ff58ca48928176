"""Quantised loading: `wmtp.load(quantization=)` against `from_pretrained` with the same
`BitsAndBytesConfig`, in load time and peak private memory.

`python -m benchmarks.quant [--quick] [--runs N] [--workdir DIR] [--out PATH]`. Full runs load
`198m` (the MTP model: wmtp only, `from_pretrained` does not build its class) and
`hf-distilgpt2`; quick runs `small` and `hf-small`. Each sample is a fresh `python`, the methods
interleaved (the order rotating). Writes `PATH.{md,json}` (default results/quant, quick
results/quant-quick); exits 1 when a target is missed past its limit, a method fails, or wmtp's
quantised weights differ from `from_pretrained`'s.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from benchmarks import harness
from benchmarks.harness import MIB, REPO, Target, median, progress, ratio, target
from benchmarks.models import SPECS, Model, ensure_model

if TYPE_CHECKING:
    import torch

QUANTIZATIONS: Final = ("int8", "nf4")
SLACK_MIB: Final = 64  # private memory allowed beyond the quantised model and one full tensor
NOTES: Final = """\
Median of {runs} runs, each a fresh `python` that imported torch, transformers, bitsandbytes and
wmtp before its clock; the methods interleaved (the order rotating). `from_pretrained` runs with
`device_map="cpu"` and the `BitsAndBytesConfig` wmtp's name stands for (int8:
`load_in_8bit=True`; nf4: `load_in_4bit=True`, `bnb_4bit_quant_type="nf4"`,
`bnb_4bit_compute_dtype=torch.bfloat16`). returns: until the call returned; materialised: until
one element per 4 KiB page of every weight was read as well. CPU: the process's CPU seconds
until the call returned (less sensitive than wall time to other work on the machine). growth:
peak private memory (`RssAnon`, sampled every 5 ms) minus `RssAnon` at the start: mapped file
pages are not private. quantised: the model's bytes after quantisation (every parameter and
buffer, and bitsandbytes' quantisation state); largest: the largest tensor of the checkpoint
(fp32). After the clock a fingerprint of every weight and quantisation state is taken: wmtp's
must be `from_pretrained`'s."""


class Job(msgspec.Struct, frozen=True):
    """One measurement: a method and a quantisation on a model folder."""

    method: str  # "wmtp" or "hf"
    quantization: str
    folder: str


class Sample(msgspec.Struct, frozen=True):
    """What one fresh process measured."""

    returns_s: float = 0.0
    materialised_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time until the call returned (all threads)
    anon_start_mib: float = 0.0
    anon_peak_mib: float = 0.0
    quantised_mib: float = 0.0  # the model's bytes after quantisation
    largest_mib: float = 0.0  # the largest tensor of the checkpoint
    layers: int = 0  # bitsandbytes' layers in the model
    fingerprint: str = ""
    problems: list[str] = []


class Row(msgspec.Struct, frozen=True):
    """Medians of one method and quantisation on one model."""

    model: str
    method: str
    quantization: str
    runs: int
    returns_s: float | None
    materialised_s: float | None
    cpu_s: float | None
    growth_mib: float | None
    quantised_mib: float | None
    largest_mib: float | None
    layers: int
    fingerprints: list[str]
    problems: list[str]


def bnb_config(quantization: str) -> Any:
    """The `BitsAndBytesConfig` that wmtp's `quantization=` stands for (4-bit: bf16 compute)."""
    import torch
    import transformers

    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return transformers.BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=torch.bfloat16
    )


def load(job: Job) -> torch.nn.Module:
    """The job's method on its folder."""
    import transformers

    import wmtp

    if job.method == "wmtp":
        return wmtp.load(job.folder, quantization=job.quantization)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
        job.folder, quantization_config=bnb_config(job.quantization), device_map="cpu"
    )
    return model


def anon_mib() -> float:
    """This process's private resident memory (`RssAnon`), in MiB."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if "RssAnon" in s)
    return int(line.split()[1]) / 1024


def states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` by name: parameters, buffers and bitsandbytes' quantisation
    state (int8: SCB; 4-bit: the QuantState as `Linear4bit` saves it)."""
    out = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, param in model.named_parameters():
        if getattr(param, "SCB", None) is not None:
            out[f"{name}.SCB"] = param.SCB  # type: ignore[attr-defined]
        if getattr(param, "quant_state", None) is not None:
            packed = param.quant_state.as_dict(packed=True)  # type: ignore[attr-defined]
            out |= {f"{name}.{key}": value for key, value in packed.items()}
    return out


def touch(model: torch.nn.Module) -> None:
    """Read one element per 4 KiB page of every weight, so mapped weights are resident."""
    seen: set[int] = set()
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            flat = tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())]
            float(flat.float().sum())


def largest_mib(folder: Path) -> float:
    """The largest tensor of the folder's checkpoint, in MiB."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes: list[list[int]] = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
    return max(4 * math.prod(shape) for shape in sizes) / MIB


def measure(job: Job) -> Sample:
    """Time the job, sampling `RssAnon` every 5 ms; then touch, then fingerprint."""
    import bitsandbytes  # noqa: F401
    import torch
    import transformers
    import transformers.integrations.bitsandbytes
    import transformers.models.gpt2.modeling_gpt2

    import wmtp.quant  # noqa: F401

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    peak, done = [anon_mib()], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anon_mib())

    start = peak[0]
    threading.Thread(target=sample, daemon=True).start()
    t0, cpu = time.perf_counter(), time.process_time()
    model = load(job)
    t1, cpu = time.perf_counter(), time.process_time() - cpu
    touch(model)
    t2 = time.perf_counter()
    done.set()
    top = max(peak[0], anon_mib())
    tensors = states(model)
    digest, quantised = hashlib.sha256(), 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    quantised = sum(
        t.untyped_storage().nbytes()
        for t in {t.untyped_storage().data_ptr(): t for t in tensors.values()}.values()
    )
    layers = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    return Sample(
        t1 - t0,
        t2 - t0,
        cpu,
        start,
        top,
        quantised / MIB,
        largest_mib(Path(job.folder)),
        layers,
        digest.hexdigest()[:16],
        [] if layers else ["no layer was quantised"],
    )


def run_sample(job: Job) -> Sample:
    """One fresh `python` measuring `job`; a failure becomes a sample that says why."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.quant",
        "--worker",
        msgspec.json.encode(job).decode(),
    ]
    done = subprocess.run(command, cwd=REPO, env=harness.child_env(), capture_output=True)
    lines = done.stdout.splitlines()
    if done.returncode or not lines:
        tail = done.stderr.decode(errors="replace")[-400:]
        sample = Sample(problems=[f"exit {done.returncode}: {tail}"])
    else:
        sample = msgspec.json.decode(lines[-1], type=Sample)
    growth = sample.anon_peak_mib - sample.anon_start_mib
    shown = sample.problems[0] if sample.problems else f"{sample.returns_s:.3f} s {growth:,.0f} MiB"
    progress(f"{Path(job.folder).name}: {job.method} {job.quantization}: {shown}")
    return sample


def summarise(model: Model, job: Job, samples: Sequence[Sample]) -> Row:
    """The row of one job."""
    good = [s for s in samples if not s.problems]
    return Row(
        model=model.spec.name,
        method=job.method,
        quantization=job.quantization,
        runs=len(good),
        returns_s=median(s.returns_s for s in good),
        materialised_s=median(s.materialised_s for s in good),
        cpu_s=median(s.cpu_s for s in good),
        growth_mib=median(s.anon_peak_mib - s.anon_start_mib for s in good),
        quantised_mib=median(s.quantised_mib for s in good),
        largest_mib=median(s.largest_mib for s in good),
        layers=max((s.layers for s in good), default=0),
        fingerprints=sorted({s.fingerprint for s in good}),
        problems=sorted({p for s in samples for p in s.problems})[:3],
    )


def targets(rows: Sequence[Row]) -> tuple[list[Target], list[str]]:
    """wmtp faster than from_pretrained; wmtp's growth within the quantised model, the largest
    tensor and `SLACK_MIB`; and the failures: wmtp's weights not from_pretrained's."""
    by = {(r.model, r.method, r.quantization): r for r in rows}
    found, failures = [], []
    for r in rows:
        if r.method != "wmtp":
            continue
        if (peer := by.get((r.model, "hf", r.quantization))) is not None:
            what = f"{r.quantization}: wmtp.load / from_pretrained, until return"
            found.append(target(r.model, what, ratio(r.returns_s, peer.returns_s), 1.0))
            if r.fingerprints and peer.fingerprints and r.fingerprints != peer.fingerprints:
                failures.append(f"{r.model}: {r.quantization}: wmtp's weights differ from hf's")
        allowed = (r.quantised_mib or 0) + (r.largest_mib or 0) + SLACK_MIB
        what = f"{r.quantization}: wmtp RssAnon growth (MiB) <= quantised + largest + {SLACK_MIB}"
        # Memory keeps its own limit: a machine's load does not move it, NOISE does not apply.
        found.append(target(r.model, what, r.growth_mib, allowed, 1.25 * allowed))
        if len(r.fingerprints) > 1:
            failures.append(f"{r.model}: {r.quantization}: wmtp's weights differ between runs")
    return found, failures


def markdown(head: str, runs: int, models: Sequence[Model], rows: Sequence[Row]) -> str:
    """The report's table."""
    by = {(r.model, r.method, r.quantization): r for r in rows}
    size = {m.spec.name: f"{m.spec.name} ({m.weight_bytes / MIB:,.0f} MiB fp32)" for m in models}
    labels = {"wmtp": "wmtp.load(quantization=)", "hf": "from_pretrained(BitsAndBytesConfig)"}
    cells = []
    for r in rows:
        peer = by.get((r.model, "hf", r.quantization)) if r.method == "wmtp" else None
        x_hf = ratio(r.returns_s, peer.returns_s) if peer else None
        what = f"{labels[r.method]} {r.quantization}" + (
            f" (**{r.problems[0]}**)" if r.problems else ""
        )
        x_cpu = ratio(r.cpu_s, peer.cpu_s) if peer else None
        cells.append([size[r.model], what, r.returns_s, r.materialised_s, x_hf, r.cpu_s, x_cpu,
                      r.growth_mib, r.quantised_mib, r.largest_mib, r.layers, r.runs])  # fmt: skip
    header = ["model", "method", "returns s", "materialised s", "x hf", "CPU s", "CPU x hf"]
    header += ["growth MiB"]
    header += ["quantised MiB", "largest MiB", "bnb layers", "runs"]
    return "\n\n".join([head, NOTES.format(runs=runs), harness.table(header, cells)])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with `--worker`, one sample); 0 when every target holds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        print(msgspec.json.encode(measure(msgspec.json.decode(argv[1], type=Job))).decode())
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI: small and hf-small, 2 runs")
    parser.add_argument("--runs", type=int, help="runs per method (default 5, quick 2)")
    parser.add_argument("--workdir", type=Path, help="keep generated models here, reuse them")
    parser.add_argument("--out", type=Path, help="results path, without suffix")
    args = parser.parse_args(argv)
    mode, runs = "quick" if args.quick else "full", args.runs or (2 if args.quick else 5)
    names = ("small", "hf-small") if args.quick else ("198m", "hf-distilgpt2")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    models, rows = [], []
    try:
        for name in names:
            models.append(model := ensure_model(SPECS[name], root))
            progress(f"model {name}: {model.weight_bytes / MIB:,.0f} MiB in {model.folder}")
            methods = ("wmtp", "hf") if model.spec.family == "hf" else ("wmtp",)
            jobs = {f"{m} {q}": Job(m, q, model.folder) for q in QUANTIZATIONS for m in methods}
            run = {key: functools.partial(run_sample, job) for key, job in jobs.items()}
            samples = harness.interleave(run, runs)
            rows += [summarise(model, job, samples[key]) for key, job in jobs.items()]
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    found, failures = targets(rows)
    failures += harness.failed(found) + [
        f"{r.model}: {r.method} {p}" for r in rows for p in r.problems
    ]
    packages = ("torch", "transformers", "bitsandbytes")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    machine = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {versions}"
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    command = " ".join(["python -m benchmarks.quant", *argv])
    head = f"## Quantised load benchmark ({mode}, {created})\n\n`{command}` on {machine}"
    text = markdown(head, runs, models, rows) + "\n\n### Targets\n\n" + harness.targets_table(found)
    if failures:
        text += "\n\n### Failures\n\n" + "\n".join(f"- {f}" for f in failures)
    print(text)
    record: dict[str, object] = {"mode": mode, "created": created, "command": command}
    record |= {"machine": machine, "models": models, "runs": runs, "rows": rows}
    out = args.out or harness.RESULTS / ("quant" if mode == "full" else "quant-quick")
    harness.write_json(out.with_suffix(".json"), record | {"targets": found, "failures": failures})
    harness.write(out.with_suffix(".md"), text + "\n")
    progress(f"wrote {out}.{{json,md}}; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a benchmark child process does: the loading methods, touching and checking weights.

Torch, transformers and wmtp are imported inside the functions, so that a floor child
(standard library only) and the `import wmtp` measurement stay free of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from benchmarks.layout import weight_files

if TYPE_CHECKING:
    import torch

PAGE: Final = 4096
READ_CHUNK: Final = 1 << 30  # one read(2) returns at most ~2 GiB on Linux; stay below


class WmtpUnavailableError(RuntimeError):
    """`wmtp.load` cannot be called (not written yet, or `import wmtp` fails)."""


def model_type(folder: Path) -> str:
    """The transformers `model_type` of the model in `folder`."""
    kind: str = json.loads((folder / "config.json").read_text())["model_type"]
    return kind


def import_libraries(folder: Path) -> None:
    """Import what every loading method needs first: torch, transformers, the model's modeling.

    This is library import, the same cost for every method (~1.6 s for torch plus transformers
    and ~2 s more for a transformers 5 modeling module here), so it is kept out of the timings.
    """
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    kind = model_type(folder)
    importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


def import_wmtp() -> Any:
    """The `wmtp` package, or a clear error if `wmtp.load` does not exist yet."""
    try:
        import wmtp
    except Exception as e:
        raise WmtpUnavailableError(f"wmtp.load not available: `import wmtp` failed: {e!r}") from e
    if not callable(getattr(wmtp, "load", None)):
        raise WmtpUnavailableError("wmtp.load not available: the wmtp package has no `load` yet")
    return wmtp


def floor_read(folder: Path) -> int:
    """Read the weight files into one preallocated buffer; the bytes read."""
    files = weight_files(folder)
    buffer = bytearray(sum(path.stat().st_size for path in files))
    view = memoryview(buffer)
    done = 0
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view[done : done + READ_CHUNK]):
                done += n
    view.release()
    return done


def floor_mmap(folder: Path) -> int:
    """Map the weight files and touch one byte per page; the number of pages touched."""
    pages = 0
    for path in weight_files(folder):
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            # A strided copy reads one byte per page in C, which faults every page in.
            pages += len(view[::PAGE].tobytes())
            view.release()
    return pages


def load_custom_class(folder: Path, class_name: str) -> Any:
    """The class `class_name` of `folder/modeling.py`, imported as the old loader did."""
    spec = importlib.util.spec_from_file_location("custom_modeling", folder / "modeling.py")
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def old_load(folder: Path) -> torch.nn.Module:
    """The replaced loader's method: random-init model, `load_file`, copying `load_state_dict`."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(folder)
    strategy = json.loads((folder / "metadata.json").read_text())["loading_strategy"]
    model: torch.nn.Module
    if strategy["loader_type"] == "huggingface":
        model = getattr(transformers, strategy["transformers_class"]).from_config(config)
    else:
        model = load_custom_class(folder, strategy["model_class_name"])(config)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):  # the old loader read only model.safetensors; shards too
        state.update(load_file(path))
    model.load_state_dict(state, strict=False)
    return model


def hf_load(folder: Path) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` on the folder."""
    import transformers

    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model


def wmtp_load(folder: Path, dtype: str | None) -> torch.nn.Module:
    """`wmtp.load` on the folder."""
    model: torch.nn.Module = import_wmtp().load(str(folder), dtype=dtype)
    return model


def unique_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's state tensors, each tied tensor once."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def touch(model: torch.nn.Module) -> float:
    """Read one element per 4 KiB page of every weight, so lazily mapped weights are resident."""
    total = 0.0
    for tensor in unique_tensors(model):
        step = max(1, PAGE // tensor.element_size())
        total += float(tensor.detach().reshape(-1)[::step].float().sum())
    return total


def forward_once(model: torch.nn.Module) -> None:
    """One forward pass on 16 tokens, without gradients."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.arange(16).unsqueeze(0))


def stored_tensors(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Checkpoint key -> file holding it, and tied name -> stored name from the headers."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    aliases: dict[str, str] = {}
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
            meta: dict[str, str] = f.metadata() or {}
            aliases.update({k: v for k, v in meta.items() if k != "format"})
    return where, aliases


def verify(model: torch.nn.Module, folder: Path, dtype: str | None) -> list[str]:
    """Problems with the model's weights against the files: every tensor of the model is compared.

    A model key absent from the checkpoint passes only if it is tied to a stored one (the
    same memory), as `lm_head.weight` is to the embedding in a Hugging Face checkpoint.
    """
    import torch
    from safetensors import safe_open

    where, aliases = stored_tensors(folder)
    want = getattr(torch, dtype) if dtype else None
    state = model.state_dict()
    pointer_owner = {t.data_ptr(): k for k, t in state.items() if k in where}
    problems: list[str] = []
    for key, tensor in state.items():
        stored = key if key in where else aliases.get(key)
        if stored is None:
            if tensor.data_ptr() not in pointer_owner:
                problems.append(f"{key}: not in the checkpoint and not tied to a stored tensor")
            continue
        with safe_open(str(where[stored]), "pt") as f:
            expected = f.get_tensor(stored)
        if want is not None:
            expected = expected.to(want)
        if tensor.device.type != "cpu" or tensor.dtype != expected.dtype:
            problems.append(f"{key}: {tensor.dtype} on {tensor.device}, want {expected.dtype}")
        elif not torch.equal(tensor, expected):
            problems.append(f"{key}: values differ from the checkpoint's {stored}")
    return problems

"""`load(location)`, its data flow on one screen, `LOADERS` (the table it dispatches on) and
`resolve(algo, paths)`. metadata.json -> fetch -> headers -> LOADERS[loader_type] finds the
class -> build empty -> remap_state_dict -> strict compare -> map the files, assign -> eval()"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, get_args

from wmtp import build
from wmtp.build import ModelClass
from wmtp.errors import MetadataError, OptionError, UntrustedCodeError, WmtpError
from wmtp.location import StorageOptions, join, local_root
from wmtp.metadata import CustomMTP, HuggingFace, LoaderType, Metadata, WmtpType, serves
from wmtp.store import fetch, read_metadata
from wmtp.weights import DTYPES, Header, checkpoint_names, read_header, read_tensors

if TYPE_CHECKING:
    import torch

Files = Mapping[str, Path]  # a model's files: name -> local path
DTYPE_ALIASES: Final = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def custom_class(location: str, strategy: CustomMTP, files: Files, config: Any) -> ModelClass:
    """`model_class_name`: a torch module class that `custom_module_file` itself defines."""
    from torch.nn import Module

    module = build.import_module_file(files[strategy.custom_module_file])
    cls = getattr(module, name := strategy.model_class_name, None)  # defined there, not imported
    if isinstance(cls, type) and issubclass(cls, Module) and cls.__module__ == module.__name__:
        return ModelClass(name, cls)
    from wmtp.explain import missing_class

    return missing_class(location, strategy, module)


def auto_class(location: str, strategy: HuggingFace, files: Files, config: Any) -> ModelClass:
    """The Auto class `transformers_class`, its model's module imported; `auto_map` never runs."""
    import transformers

    name = strategy.transformers_class
    if code := (getattr(config, "auto_map", None) or {}).get(name):
        raise MetadataError(f"{files['config.json']}: `$.auto_map` would run {code!r} for {name}; "
                            "remove it, or load that code as loader_type custom_mtp")  # fmt: skip
    if name.startswith("AutoModel") and hasattr(transformers, name):
        (auto := getattr(transformers, name))._model_mapping.get(type(config), None)  # import now
        return ModelClass(name, lambda config: auto.from_config(config, trust_remote_code=False))
    from wmtp.explain import not_auto_class

    raise not_auto_class(location, name)


Finder = Callable[[str, Any, Files, Any], ModelClass]  # location, strategy, files, config
LOADERS: Final[dict[LoaderType, Finder]] = {"custom_mtp": custom_class, "huggingface": auto_class}


def plan(
    location: str,
    meta: Metadata,
    files: Files,
    headers: Mapping[str, Header],
    cast: torch.dtype | None = None,
    overrides: Mapping[str, Any] | None = None,
    tick: Callable[[float], object] = lambda _: None,
) -> tuple[torch.nn.Module, build.Groups, dict[str, str]]:
    """The model built empty (`overrides` set), its tied groups and key -> checkpoint key, once
    the `headers` fit it exactly (keys, shapes, dtypes: floats one, or `cast`); else the error."""
    strategy, source = meta.loading_strategy, join(location, "metadata.json")
    with build.LOCK:
        try:
            config, replaced = build.read_config(files["config.json"], overrides or {})
            cls = LOADERS[strategy.loader_type](location, strategy, files, config)
        except ImportError as e:  # the model's own module is a MetadataError: this is a package
            from wmtp.hints import package_error

            raise package_error(source, e) from e
    tick(time.perf_counter())  # config and class in hand: transformers and the model imported
    found = {k: (t.shape, DTYPES[t.dtype]) for h in headers.values() for k, t in h.tensors.items()}
    what, most = f"{files['config.json']} ({cls.name})", 4 * len(found) + 64  # tied: fewer
    model = build.build_empty(cls.build, config, what, most)
    vars(model)["wmtp_replaced_config"] = replaced  # `wmtp.save` writes these back
    if len(found) < sum(len(h.tensors) for h in headers.values()):  # the last would win
        from wmtp.explain import stored_twice

        raise stored_twice(location, headers)
    state, tied = model.state_dict(keep_vars=True), dict[int, list[str]]()
    for key, tensor in state.items():  # tied weights: one tensor under several names
        tied.setdefault(id(tensor), []).append(key)
    floats = Counter(d for _, d in found.values() if "float" in d)  # the model takes their type
    one = str(cast)[6:] if cast else max(floats, key=floats.__getitem__, default="float32")
    found = {k: (s, one if cast and "float" in d else d) for k, (s, d) in found.items()}
    expected = {k: (tuple(t.shape), one if t.is_floating_point() else str(t.dtype)[6:])
                for k, t in state.items()}  # fmt: skip
    groups, mapping = [tuple(names) for names in tied.values()], strategy.state_dict_mapping
    keys = build.remap_state_dict(dict(zip(found, found, strict=True)), mapping)  # regexes once
    renamed = {key: found[name] for key, name in keys.items()}
    if cls.problems or any(build.compare(expected, groups, renamed)):
        from wmtp.explain import refusal

        raise refusal(source, cls.problems, model, config, found, mapping, expected, groups)
    return model, groups, keys


def trusted(location: str, meta: Metadata, trust_code: bool) -> None:
    """Raise `UntrustedCodeError` when the model's own module is remote and not trusted."""
    module = meta.loading_strategy.custom_module_file
    if module and local_root(location) is None and not trust_code:
        why = "pass trust_code=True (CLI: --trust-code) if you trust whoever can write there"
        raise UntrustedCodeError(f"{join(location, module)} would run as code here; {why}")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating `torch.dtype` from itself or a name ("bf16", "fp32"...), else `OptionError`."""
    import torch

    name = str(dtype).lower().removeprefix("torch.")
    found = None if dtype is None else getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if dtype is None or (isinstance(found, torch.dtype) and found.is_floating_point):
        return found
    from wmtp.hints import unknown_dtype

    raise unknown_dtype(dtype, DTYPE_ALIASES)


def parse_device(device: torch.device | str | None) -> torch.device | None:
    """A usable `torch.device` from itself or a name; "auto": cuda, else mps, else cpu."""
    import torch

    if device == "auto":
        device = next((d for d in ("cuda", "mps") if getattr(torch, d).is_available()), "cpu")
    try:  # a value read back proves the name, that this machine has it and that it holds data
        probe = None if device is None else torch.zeros(1, device=device)
        return None if probe is None else probe.device if probe.tolist() == [0] else None
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise OptionError(f"device {device!r} is not usable here: {e}") from None


def load(
    location: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    storage_options: StorageOptions | None = None,
    trust_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    verify: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    parallelize: Callable[[torch.nn.Module], Any] | None = None,
    quantization: str | None = None,
    train: bool = False,
    timings: dict[str, float] | None = None,
) -> torch.nn.Module:
    """Load the model at `location` exactly as its `metadata.json` says, in eval mode. Keys,
    shapes and dtypes are checked from the headers first; weights are mapped, never copied.

    Args:
        location: the model folder, a path or URL (`file://`, `s3://`, `gs://`, `https://`...).
        dtype: cast floating tensors to this (`torch.bfloat16`, "bf16", ...); None keeps them.
        device: "cpu", "cuda:1"... or "auto" (cuda, else mps, else cpu); None: the CPU.
        storage_options: obstore settings for remote locations (win over the environment).
        trust_code: run a remote model's own module (a local folder's code always runs).
        cache_dir: where remote files are cached (default `$WMTP_CACHE_DIR`, `~/.cache/wmtp`).
        progress: a download progress bar; None shows one when stderr is a terminal.
        verify: hash local files against the manifest (downloads are always hashed).
        config_overrides: config settings to change before the model is built, e.g.
            `{"output_hidden_states": True}`; a setting the config lacks is an `OptionError`.
        parallelize: shards the model built empty (FSDP2, TP); ranks fill their own shards.
        quantization: "int8", "nf4" or "fp4": bitsandbytes' layers, quantised as read.
        train: in train mode, CPU weights copied private now, not at the first step (pages).
        timings: a dict to fill with seconds per phase: fetch, import, build, assign.

    Raises:
        MetadataError: bad metadata, class (missing, failing to build) or safetensors file;
            OptionError: a bad dtype, device or override; WeightsError: keys, shapes or dtypes
            that do not fit; ModelFileError, UntrustedCodeError, IntegrityError, FetchError...

    Example:
        >>> type(wmtp.load("examples/tiny-mtp", dtype="bf16")).__name__
        'DistilGPT2MTP'
    """
    marks = [time.perf_counter()]  # and the end of each phase: fetch, import, build, assign
    meta = read_metadata(location := os.fspath(location), storage_options=storage_options)
    cast, place, strategy = parse_dtype(dtype), parse_device(device), meta.loading_strategy
    trusted(location, meta, trust_code)
    options: dict[str, Any] = {"storage_options": storage_options, "cache_dir": cache_dir}
    options |= {"progress": progress, "manifest": meta.files, "verify": verify}
    files = fetch(location, strategy.required_files, **options)
    names = checkpoint_names(strategy.required_files, files)
    files |= fetch(location, [n for n in names if n not in files], **options)
    headers = {n: read_header(files[n], join(location, n)) for n in names}
    marks.append(time.perf_counter())
    model, groups, keys = plan(location, meta, files, headers, cast, config_overrides, marks.append)
    marks.append(time.perf_counter())
    tensors = read_tensors(files, headers, None if parallelize or quantization else cast)
    named = {key: tensors[name] for key, name in keys.items()}
    if quantization is not None:  # bitsandbytes' layers, each weight quantised on `place`
        from wmtp.quant import quantize

        model = quantize(model, named, groups, quantization, strategy, cast, place, parallelize)
    elif parallelize is None:
        build.assign(model, named, groups)
    else:  # each rank fills (and casts) its own shards, on the mesh's device
        from wmtp.shard import fill_shards

        model = fill_shards(model, named, groups, parallelize, place, cast)
    marks.append(time.perf_counter())
    if timings is not None:
        phases = ("fetch", "import", "build", "assign")
        timings |= zip(phases, (b - a for a, b in pairwise(marks)), strict=True)
    model = model.train(train) if place is None else model.train(train).to(place)
    if train:  # an optimizer will write the weights: copy the mapped pages now, in bulk
        from wmtp.pages import populate

        populate(model.parameters())
    return model


def resolve(
    algo: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    role: WmtpType | None = None,
    storage_options: StorageOptions | None = None,
) -> str:
    """The first of `paths`, in order, whose metadata lists `algo` (and whose `wmtp_type`
    is `role`, when given). Only each candidate's `metadata.json` is read, all at once.

    Raises:
        NoCompatibleModelError: none fits (each one's reason, a close name for a typo of `algo`).
        OptionError: `role` is not a known wmtp_type.

    Example:
        >>> resolve("critic-wmtp", ["models/mtp", "models/rm"], role="reward_model")
        'models/rm'
    """
    if role is not None and role not in get_args(WmtpType):
        raise OptionError(f"role {role!r} is not a wmtp_type; use one of {get_args(WmtpType)}")
    seen: dict[str, Metadata | str] = {}  # a candidate's metadata, or why it cannot be read
    for path, meta in read_all(paths, storage_options):  # no wait for those after the answer
        if serves(seen.setdefault(path, meta), algo, role):
            return path
    from wmtp.explain import no_candidate

    raise no_candidate(seen, algo, role)


def read_all(
    paths: Sequence[str | os.PathLike[str]], options: StorageOptions | None
) -> Iterator[tuple[str, Metadata | str]]:
    """Each path's metadata, or why it cannot be read (each failure its own reason), in order
    as soon as known. All are read at once; a caller may stop at its answer."""
    if isinstance(paths, str | os.PathLike):  # its characters are no candidates
        raise OptionError(f"paths takes a list of folders or URLs, not one: [{paths!r}]")

    def read(path: str | os.PathLike[str]) -> Metadata | str:
        try:
            return read_metadata(path, storage_options=options)
        except WmtpError as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"

    pool = ThreadPoolExecutor(max(1, min(16, len(paths))))
    futures = [pool.submit(read, path) for path in paths]
    pool.shutdown(wait=False)  # no wait for the rest; a stalled read times out
    return ((os.fspath(p), future.result()) for p, future in zip(paths, futures, strict=True))

"""Hostile metadata.json and config.json: a load either gives the model exactly as the files
hold it, or raises a `wmtp.WmtpError`; never another exception, never a hang.

The mutations are data drawn by a `Pick` (hypothesis here; a seeded `random.Random` in
`benchmarks/hostile.py`, which measures the same space at scale). Each example runs in
`tests/sandbox.py`'s child with a deadline: a FIFO or a catastrophic regex must not hang
the test run. `WMTP_FUZZ_EXAMPLES` bounds the examples (default 150: ~20 s on 2 cores when
they pass; a hang costs `WMTP_FUZZ_DEADLINE`, 20 s, twice: found, then replayed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import regex
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import builders, sandbox

Pick = Callable[[Sequence[Any]], Any]  # one element of a sequence: rng.choice, or a draw
Docs = Mapping[str, Mapping[str, Any]]  # model -> file name -> its valid JSON
FILES: Final = ("metadata.json", "config.json")
FUZZED: Final = ("mtp", "llama_mtp", "gpt2_reference", "distilbert_reward")
DEADLINE: Final = float(os.environ.get("WMTP_FUZZ_DEADLINE", "20"))

BAD_PATHS: Final = (
    *(".", "./x", "a//b", "sub/..", "..", "../x", "../../etc/passwd", "/abs", "/etc/passwd"),
    *("a\x00b", "s3://b/x", "http://127.0.0.1:9/x", "C:x", "a\\b", "", "x/", " config.json"),
    *("config.json/", "CONFIG.JSON", "nope.safetensors", "model.bin"),
    "model.safetensors.index.json",
)  # fmt: skip
VALUES: Final[tuple[Any, ...]] = (
    *(None, 0, -1, 1.5, True, "", "two", [], {}, 10**12, 2**64, -(2**63), "\x00", ["x"]),
    *({"a": 1}, "a" * 5000, float("nan"), float("inf")),
)  # fmt: skip
TRANSFORMS: Final[tuple[Any, ...]] = (
    *({r"([\w.]+)+Z": "x"}, {r"(.*)*Z": "x"}, {"(": "x"}, {"(.*)": r"\q"}, {"(.*)": r"\g<99>"}),
    *({"(.*)": r"\2"}, {".*": None}, {".*": "same"}, {"(.*)": r"\1"}, {"(.*)": r"\g<0>"}),
    *({r"transformer\.(.*)": r"\1"}, {r"(.*)\.weight": r"\1.bias"}, {"": "x"}, {"x" * 5000: "y"}),
    *({"(?P<a>.*)": r"\g<a>"}, {"(.*)": r"\1\1"}, {"(.*)": "a\x00b"}, {"(?i)": None}, []),
)  # fmt: skip
# Values that mean something to one field of metadata.json (by its JSON path).
META: Final[Mapping[tuple[str, ...], Sequence[Any]]] = {
    ("wmtp_type",): ["base", "BASE_MODEL", "reward_model", "", None, 1],
    ("storage_version",): ["1.0", "2", 2.0, "2.0 ", None],
    ("algorithm_compatibility",): [[], "critic-wmtp", [1], [None], ["critic-wmtp"] * 2],
    ("loading_strategy",): [None, [], {}, "huggingface"],
    ("loading_strategy", "loader_type"): ["custom", "HuggingFace", "", None, "custom_mtp",
                                          "huggingface"],
    ("loading_strategy", "required_files"): [[], ["config.json"], "config.json", [None]],
    ("loading_strategy", "state_dict_mapping"): [None, {}, [], {"unknown": 1}],
    ("loading_strategy", "state_dict_mapping", "key_transforms"): TRANSFORMS,
    ("loading_strategy", "state_dict_mapping", "remove_prefix"): ["transformer.", "model.", "", 5],
    ("loading_strategy", "state_dict_mapping", "add_prefix"): ["transformer.", "model.", "", "."],
    ("loading_strategy", "model_class_name"): ["Nope", "", "Module", "GPT2Model", "__class__",
                                               "LlamaMTP"],
    ("loading_strategy", "custom_module_file"): ["config.json", "nope.py", "../modeling.py",
                                                 "/x.py", "modeling"],
    ("loading_strategy", "transformers_class"): [
        *("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoConfig"),
        *("GPT2LMHeadModel", "AutoModelForMaskedLM", "", "os.system", "AutoModelForVision2Seq"),
    ],
    ("files",): [None, {}, [], {"nope.bin": {"size": 1, "sha256": "0" * 64}}, {"../x": {}}],
    ("files", "config.json", "size"): [0, -1, 10**12, "1", None],
    ("files", "model.safetensors", "sha256"): ["0" * 64, "", "X" * 64, None],
    ("files", "model.safetensors", "size"): [0, 1, -1, 2**63],
}  # fmt: skip
# Values that mean something to a field of config.json (used where the config has it).
CONFIG: Final[Mapping[str, Sequence[Any]]] = {
    "model_type": ["gpt3", "", None, "llama", "bert", "gpt2", 1],
    "n_head": [0, -1, 3, "two", 1.5, None, 10**12], "n_embd": [33, 0, -32, "32", 10**12],
    "n_layer": [0, -1, "two", 10**5, None], "vocab_size": [0, -1, 10**12, 127, "128"],
    "n_positions": [0, -1, 10**12, 10**9], "num_attention_heads": [0, 3, -1, "4"],
    "hidden_size": [33, 0, 10**12], "num_hidden_layers": [0, "two"], "num_key_value_heads": [0, 3],
    "intermediate_size": [0, -1, 10**12], "max_position_embeddings": [0, -1, 10**12, 10**9],
    "head_dim": [0, -8, 7], "dim": [33, 0], "n_heads": [0, 3], "n_layers": ["two", 0],
    "hidden_dim": [0, -1], "mtp_config": [None, {"n_future_tokens": 0}, {"n_future_tokens": -1}],
    "auto_map": [{"AutoModelForCausalLM": "evil-org/repo--modeling.Evil"}, {"AutoModel": "x.Y"}],
    "architectures": [["Evil"], None, "GPT2LMHeadModel"], "tie_word_embeddings": [False, "yes"],
    "dtype": ["int8", "bogus", "float16", None], "rope_parameters": [{"rope_type": "bogus"}, "x"],
}  # fmt: skip
WHOLE: Final = (
    *("fifo", "directory", "symlink loop", "dangling symlink", "/dev/zero", "empty", "garbage"),
    *("json list", "json null", "deep nesting", "duplicate key", "utf-8 bom", "utf-16", "NaN"),
    "trailing garbage",
)  # fmt: skip
LOCATIONS: Final = (
    *("", ".", "{folder}/", "{folder}//", "{folder}/.", "file://{folder}", "FILE://{folder}"),
    *("file:{folder}", "file://localhost{folder}", "{folder}/metadata.json", "{folder}/nope"),
    *("{folder}\x00", "{folder}/../{name}", "~nobody-wmtp/m", "foo://{folder}", "{folder}?x=1"),
)  # fmt: skip
# How often each kind of mutation is drawn, in 16.
KINDS: Final = {"meta field": 4, "meta any": 3, "meta list": 1, "config field": 3, "config any": 1,
                "add field": 1, "whole file": 2, "location": 1}  # fmt: skip


class Mutation(msgspec.Struct, frozen=True):
    """One hostile edit of a model folder: `op` on `file` ("location": the string loaded) at
    JSON `path`, with `value`."""

    file: str
    op: str
    path: tuple[str | int, ...] = ()
    value: Any = None


# Edits among those drawn that leave a model loadable, as the README and the schema define it:
# the folder named another way, a field other tools add at the top, a role or algorithm list
# `load` does not read, no manifest, an empty mapping or prefix. A case made only of these
# must load, and equal its files: an oracle that took any WmtpError would pass a `load` that
# refuses every model.
SAME_FOLDER: Final = ("{folder}/", "{folder}//", "{folder}/.", "file://{folder}", "FILE://{folder}",
                      "file://localhost{folder}", "{folder}/../{name}")  # fmt: skip
MAPPING: Final = ("loading_strategy", "state_dict_mapping")
HARMLESS: Final = (
    *(Mutation("location", "set", (), location) for location in SAME_FOLDER),
    *(Mutation("metadata.json", "set", (key,), 1) for key in ("unknown", "Wmtp_Type", "__proto__")),
    Mutation("metadata.json", "set", ("wmtp_type",), "reward_model"),
    Mutation("metadata.json", "set", ("algorithm_compatibility",), []),
    Mutation("metadata.json", "set", ("algorithm_compatibility",), ["critic-wmtp"] * 2),
    Mutation("metadata.json", "set", ("files",), None),
    Mutation("metadata.json", "set", ("files",), {}),
    Mutation("metadata.json", "set", MAPPING, {}),
    Mutation("metadata.json", "set", (*MAPPING, "remove_prefix"), ""),
    Mutation("metadata.json", "set", (*MAPPING, "add_prefix"), ""),
)


def draw_case(pick: Pick, docs: Docs) -> tuple[str, tuple[Mutation, ...]]:
    """A model of `docs` and one to three mutations of its files."""
    model = pick(sorted(docs))
    return model, tuple(draw(pick, docs[model]) for _ in range(pick((1, 1, 1, 2, 3))))


def draw(pick: Pick, files: Mapping[str, Any]) -> Mutation:
    """One mutation of a model's valid `files` (name -> JSON)."""
    kind = pick([kind for kind, n in KINDS.items() for _ in range(n)])
    if kind == "meta field":
        path = pick(sorted(META))
        return Mutation("metadata.json", "set", path, pick(META[path]))
    if kind == "config field":
        key = pick(sorted(k for k in CONFIG if k in files["config.json"] or k == "auto_map"))
        return Mutation("config.json", "set", (key,), pick(CONFIG[key]))
    if kind == "whole file":
        return Mutation(pick(FILES), "whole", (), pick(WHOLE))
    if kind == "location":
        return Mutation("location", "set", (), pick(LOCATIONS))
    file = "config.json" if kind == "config any" else "metadata.json"
    paths = leaves(files[file])
    if kind == "add field":
        parent = pick([(), *(p for p, v in paths if isinstance(v, dict))])
        return Mutation(file, "set", (*parent, pick(("unknown", "Wmtp_Type", "__proto__"))), 1)
    if kind == "meta list":  # required_files, algorithm_compatibility
        path = pick([p for p, v in paths if isinstance(v, list)])
        op = pick(("append", "duplicate"))
        return Mutation(file, op, path, pick((*BAD_PATHS, *VALUES)) if op == "append" else None)
    path, value = pick(paths)
    op = pick(("set", "set", "delete", "rename", "retype"))
    if op == "rename":
        return Mutation(file, op, path, pick((str(path[-1]).upper(), f"{path[-1]}_")))
    if op == "retype":
        return Mutation(file, "set", path, pick(([value], str(value), {"value": value})))
    pool = (*BAD_PATHS, *VALUES) if isinstance(value, str) else VALUES
    return Mutation(file, op, path, pick(pool) if op == "set" else None)


def leaves(doc: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], Any]]:
    """Every (JSON path, value) below the root of `doc`, containers included."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if type(doc) is list else []
    return [pair for k, v in items for pair in [((*path, k), v), *leaves(v, (*path, k))]]


def describe(model: str, edits: Sequence[Mutation]) -> str:
    """One line that says which model and what was done to its files."""
    parts = []
    for m in edits:
        value = f" = {m.value!r:.60}" if m.op in ("set", "append", "rename", "whole") else ""
        parts.append(" ".join([m.file, m.op, *[jsonpath(m.path)] * bool(m.path)]) + value)
    return f"{model}: " + "; ".join(parts)


def jsonpath(path: Sequence[str | int]) -> str:
    """`path` as msgspec writes it in errors: `$.loading_strategy.required_files[0]`."""
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)


def apply(folder: Path, edits: Sequence[Mutation]) -> str:
    """Make the edits in `folder` and return the location to load. config.json edits come
    first and its manifest entry is made true again, so a stale manifest hides nothing."""
    location, order = str(folder), {"config.json": 0, "metadata.json": 1, "location": 2}
    for m in sorted(edits, key=lambda m: order[m.file]):
        path = folder / m.file
        if m.file == "location":
            location = m.value.format(folder=folder, name=folder.name)
        elif m.op == "whole":
            replace(path, m.value)
        elif path.is_file() and not path.is_symlink():
            with contextlib.suppress(ValueError, RecursionError):  # garbage since an earlier edit
                path.write_text(json.dumps(edit(json.loads(path.read_bytes()), m)))
        if m.file == "config.json" and path.is_file() and (folder / "metadata.json").is_file():
            builders.refresh_manifest(folder, "config.json")
    return location


def edit(doc: Any, m: Mutation) -> Any:
    """`doc` with mutation `m` made in place; unchanged where its path no longer exists."""
    node, (*parents, last) = doc, m.path
    try:
        for key in parents:
            node = node[key]
        if m.op == "set":
            node[last] = m.value
        elif m.op == "delete":
            del node[last]
        elif m.op == "rename":
            node[m.value] = node.pop(last)
        elif m.op == "append":
            node[last].append(m.value)
        elif m.op == "duplicate":
            node[last] = [*node[last], *node[last]]
    except (KeyError, IndexError, TypeError, AttributeError):
        pass  # an earlier edit changed the document: this one no longer applies
    return doc


def replace(path: Path, kind: str) -> None:
    """Replace the file at `path` by something that is not a JSON object in a regular file."""
    text = path.read_bytes().decode(errors="replace") if path.is_file() else "{}"
    body = text.strip().removeprefix("{")
    if path.is_dir() and not path.is_symlink():  # an earlier edit made it one
        path.rmdir()
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind in ("symlink loop", "dangling symlink", "/dev/zero"):
        targets = {"symlink loop": path.name, "dangling symlink": "nope.json"}
        path.symlink_to(targets.get(kind, kind))
    else:
        data = {
            "empty": b"",
            "garbage": bytes(range(256)) * 4,
            "json list": b"[1, 2]",
            "json null": b"null",
            "deep nesting": b"[" * 100_000 + b"]" * 100_000,
            "duplicate key": ('{"model_type": "nope", "wmtp_type": "nope", ' + body).encode(),
            "utf-8 bom": b"\xef\xbb\xbf" + text.encode(),
            "utf-16": text.encode("utf-16"),
            "NaN": ('{"NaN": NaN, ' + body).encode(),
            "trailing garbage": text.encode() + b"}x",
        }
        path.write_bytes(data[kind])


def load_exactly(
    location: str, folder: str, dtype: str | None = None, device: str | None = None
) -> str:
    """`wmtp.load(location)`, then every tensor compared with what safetensors' own
    `load_file` reads from the folder's checkpoint under the metadata's key mapping: ""
    when all are equal, else what is wrong (the case runs in the sandbox's child)."""
    import torch
    from safetensors.torch import load_file

    import wmtp

    model = wmtp.load(location, dtype=dtype, device=device, progress=False)
    root = Path(folder)
    strategy = json.loads((root / "metadata.json").read_text())["loading_strategy"]
    required, mapping = strategy["required_files"], strategy.get("state_dict_mapping") or {}
    names = [n for n in required if n.endswith(".safetensors")]
    for index in (n for n in required if n.endswith(".safetensors.index.json")):
        names += json.loads((root / index).read_text())["weight_map"].values()
    state, wrong, seen = model.state_dict(keep_vars=True), [], set[int]()
    for name in dict.fromkeys(names):
        try:
            tensors = load_file(root / name)
        except Exception as e:  # wmtp loaded what safetensors' own reader refuses
            return f"safetensors refuses {name} ({e}), but wmtp.load returned a model"
        for key, tensor in tensors.items():
            if (new := remap(key, mapping)) is None:
                continue
            if dtype and tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, dtype))
            got = state.get(new)
            if got is None:
                wrong.append(f"{new} (from {name}:{key}) is not in the model")
            elif got.is_meta or not torch.equal(got.data.cpu(), tensor):  # values, any dtype
                wrong.append(f"{new} differs from {name}:{key} ({got.dtype} on {got.device})")
            seen.add(id(got))
    wrong += [f"{k} is not from the checkpoint" for k, t in state.items() if id(t) not in seen]
    return "; ".join(wrong[:3]) + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")


def remap(key: str, mapping: Mapping[str, Any]) -> str | None:
    """The model key of checkpoint `key`, as the README defines the mapping (not wmtp's code)."""
    if (prefix := mapping.get("remove_prefix")) and key.startswith(prefix):
        key = key[len(prefix) :]
    for pattern, replacement in (mapping.get("key_transforms") or {}).items():
        # The engine the README names: Python's `re` could backtrack for years on ([\w.]+)+Z.
        if match := regex.fullmatch(pattern, key, timeout=30):
            if replacement is None:
                return None
            key = match.expand(replacement)
            break
    return (mapping.get("add_prefix") or "") + key


def valid_docs(models: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """The valid metadata.json and config.json of each fuzzed model."""
    return {m: {f: json.loads((models[m] / f).read_text()) for f in FILES} for m in FUZZED}


@settings(
    max_examples=int(os.environ.get("WMTP_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize="CI" in os.environ,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # shrinking would rerun hangs
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_metadata_loads_exactly_or_raises_wmtp_error(
    data: st.DataObject, models: dict[str, Path]
) -> None:
    model, edits = draw_case(lambda seq: data.draw(st.sampled_from(seq)), valid_docs(models))
    case = describe(model, edits)
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(models[model], Path(tmp) / model)
        location = apply(folder, edits)
        outcome = sandbox.run(load_exactly, location, str(folder), deadline=DEADLINE)
    why = f"{outcome.kind} {outcome.type}: {outcome.message} (at {outcome.where or '?'})"
    assert outcome.kind in ("ok", "wmtp_error"), f"{case} -> {why}"
    assert outcome.kind != "ok" or outcome.result == "", f"{case} -> loaded wrong: {outcome.result}"
    if all(edit in HARMLESS for edit in edits):
        assert outcome.kind == "ok", f"{case} is a valid model -> {why}"


def test_valid_models_load_exactly_unedited_and_after_each_harmless_edit(
    models: dict[str, Path],
) -> None:
    """The oracle's other half, drawn for sure: what must load, loads, equal to its files
    (each model unedited, and each harmless edit on one of them in turn)."""
    cases: list[tuple[str, tuple[Mutation, ...]]] = [(model, ()) for model in FUZZED]
    cases += [(FUZZED[i % len(FUZZED)], (edit,)) for i, edit in enumerate(HARMLESS)]
    wrong = []
    for model, edits in cases:
        with tempfile.TemporaryDirectory() as tmp:
            folder = shutil.copytree(models[model], Path(tmp) / model)
            location = apply(folder, edits)
            outcome = sandbox.run(load_exactly, location, str(folder), deadline=DEADLINE)
        if outcome.kind != "ok" or outcome.result != "":
            why = f"{outcome.kind} {outcome.type}: {outcome.message}{outcome.result or ''}"
            wrong.append(f"{describe(model, edits)} -> {why}")
    assert wrong == []

"""How wmtp meets hostile inputs: crafted safetensors files, fuzzed metadata.json and
config.json, bad command-line and load options, `resolve` candidates that cannot be read,
`save` given bad arguments, destinations and models (or killed over a model), `storage_options`
of the wrong types and broken AWS files, and two S3 servers (a mirror answering with the other
one's ETags) sharing one download cache.

    python -m benchmarks.hostile [--quick] [--out benchmarks/results/hostile] [--only TEXT]

Every case runs in `tests/sandbox.py`'s child with a deadline and gets one verdict: ok (a
model equal to what safetensors reads, or the right answer), a clear WmtpError (it names the
offending file, key, option or JSON path), a WmtpError that does not name it, another
exception (a traceback for a CLI user), silently wrong (a model that differs from the files,
or `check`/`inspect` passing what `load` or safetensors' own reader refuses) or a hang.
Writes `<out>.md` (the table, and every run that is neither a clear refusal nor an expected
ok) and `<out>.json` (every run). Models are built by tests/builders.py in a temporary folder
and fuzzed cases come from a seeded `random.Random`, so a run is reproducible: `--only TEXT`
reruns the cases whose name holds TEXT, `--workdir DIR` keeps their files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from benchmarks.harness import QUIET, RESULTS
from tests import builders, sandbox
from tests import test_fuzz as fuzz

Verdict = Literal["ok", "clear", "unnamed", "other", "wrong", "hang"]
Expect = Literal["refuse", "ok", "either"]
Run = tuple[str, Callable[..., Any], tuple[Any, ...]]  # API, case function, its arguments
Answer = tuple[int, str, str]  # exit code (0: went through), output, what is wrong ("": nothing)
Header = dict[str, Any]
Edit = Callable[[Header, bytes], bytes]  # a checkpoint's header and data -> the file's bytes
Craft = Callable[[Path], None]  # makes a model folder hostile
COLUMNS: Final[dict[Verdict, str]] = {
    "ok": "ok",
    "clear": "clear WmtpError",
    "unnamed": "WmtpError not naming it",
    "other": "other exception / traceback",
    "wrong": "silently wrong",
    "hang": "hang",
}
INDEX: Final = "model.safetensors.index.json"
SHARDS: Final = ("model.safetensors", "a.safetensors", "b.safetensors", "missing.safetensors")
KEYS: Final = ("lm_head.weight", "transformer.wpe.weight", "extra.", "''")  # keys crafts change
# Nothing listens on port 9, and explicit keys and region keep obstore from looking up others.
S3_OPTIONS: Final = dict(endpoint="http://127.0.0.1:9", allow_http="true", max_retries="0",
                         access_key_id="x", secret_access_key="y", region="us-east-1")  # fmt: skip
S3: Final = ["s3://bucket/model", *(a for k, v in S3_OPTIONS.items() for a in ("-o", f"{k}={v}"))]


class Case(msgspec.Struct, frozen=True):
    """An input: `make` writes its folder (if any) and returns the runs of the APIs it feeds."""

    family: str
    name: str
    make: Callable[[], Sequence[Run]]
    naming: tuple[str, ...]  # strings that name the offending file, key, option or JSON path
    expect: Expect = "refuse"
    folder: Path | None = None  # deleted after the case, unless --workdir


class Result(msgspec.Struct, frozen=True):
    """One run of one case: its verdict, the exception or output, and why it is listed."""

    family: str
    case: str
    api: str
    expect: Expect
    verdict: Verdict
    type: str
    message: str
    where: str
    detail: str
    note: str
    seconds: float


# Case functions: they run in the sandbox's child and return an Answer.


def api_load(location: str, folder: str, dtype: Any = None, device: Any = None) -> Answer:
    return 0, "", fuzz.load_exactly(location, folder, dtype, device)


def api_check(location: str) -> Answer:
    from wmtp.check import check

    problems = check(location).problems
    return int(bool(problems)), "\n".join(problems), ""


def api_inspect(location: str) -> Answer:
    from wmtp.check import inspect_model

    return 0, json.dumps(inspect_model(location)["tensors"]), ""


def api_cli(argv: list[str]) -> Answer:
    from wmtp.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), ""


def api_resolve(algo: str, paths: list[str], role: Any, options: Any, want: str) -> Answer:
    import wmtp

    chosen = wmtp.resolve(algo, paths, role=role, storage_options=options)
    return 0, chosen, "" if chosen == want else f"chose {chosen!r}, not {want!r}"


# Crafted safetensors files: edits of a valid checkpoint's header and data.


def split(path: Path) -> tuple[Header, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st(head: Header | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: the header's length (or `length`), the header (a dict or bytes),
    `data`."""
    text = head if isinstance(head, bytes) else json.dumps(head).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def keys(h: Header) -> list[str]:
    """The tensor names of a header, in the order of their data."""
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def at(h: Header, i: int, field: str = "data_offsets") -> Any:
    return h[keys(h)[i]][field]


def change(h: Header, i: int, **fields: Any) -> Header:
    """A copy of `h` whose `i`-th tensor (in data order) has `fields`; a callable is given
    the field's value."""
    new = copy.deepcopy(h)
    new[keys(h)[i]] |= {k: v(h[keys(h)[i]][k]) if callable(v) else v for k, v in fields.items()}
    return new


def shift(h: Header, by: int, start: int = 0) -> Header:
    """A copy of `h` whose tensors from data offset `start` on are moved by `by` bytes."""
    new = copy.deepcopy(h)
    for k in keys(h):
        if h[k]["data_offsets"][0] >= start:
            new[k]["data_offsets"] = [o + by for o in h[k]["data_offsets"]]
    return new


def tensor(i: int, **fields: Any) -> Edit:
    """The `i`-th tensor given `fields` (see `change`); the data kept."""
    return lambda h, d: st(change(h, i, **fields), d)


def raw(h: Header) -> bytes:
    return json.dumps(h).encode()


def twins(h: Header) -> int:
    """The first tensor with as many bytes as the next one."""
    size = [b - a for a, b in (at(h, i) for i in range(len(keys(h))))]
    return next(i for i in range(len(size) - 1) if size[i] == size[i + 1])


def same_bytes(h: Header, d: bytes) -> bytes:
    return st(change(h, twins(h) + 1, data_offsets=at(h, twins(h))), d)


def duplicated(h: Header, d: bytes) -> bytes:
    """The JSON holds a key twice; the second would win and point at its twin's bytes."""
    extra = json.dumps({keys(h)[twins(h)]: h[keys(h)[twins(h) + 1]]})[1:]
    return st(raw(h)[:-1] + b", " + extra.encode(), d)


def swapped(h: Header, d: bytes) -> bytes:
    """Valid: the first two tensors' data stored in the other order."""
    (b0, e0), (b1, e1) = at(h, 0), at(h, 1)
    h = change(change(h, 1, data_offsets=[0, e1 - b1]), 0, data_offsets=[e1 - b1, e1])
    return st(h, d[b1:e1] + d[b0:e0] + d[e1:])


def gap(h: Header, d: bytes) -> bytes:
    start = at(h, 1)[0]
    return st(shift(h, 4, start), d[:start] + bytes(4) + d[start:])


def metadata(value: Any) -> Edit:
    return lambda h, d: st(h | {"__metadata__": value}, d)


def as_bytes(shape: list[int]) -> list[int]:
    """The shape of a 1-byte dtype over an F32 tensor's bytes."""
    return [4 * math.prod(shape)]


HEADER: Final[dict[str, tuple[Expect, Edit]]] = {
    "unchanged (valid)": ("ok", lambda h, d: st(h, d)),
    "header padded with spaces (valid)": ("ok", lambda h, d: st(raw(h) + b"  ", d)),
    "tensors stored out of key order (valid)": ("ok", swapped),
    "offsets past the data": ("refuse", tensor(-1, data_offsets=lambda o: [o[0], o[1] + 8])),
    "end offset 2**62": ("refuse", tensor(-1, data_offsets=lambda o: [o[0], 2**62])),
    "negative begin offset": ("refuse", tensor(0, data_offsets=lambda o: [-4, o[1]])),
    "negative offsets": ("refuse", tensor(0, data_offsets=[-8, -4], shape=[1])),
    "reversed offsets": ("refuse", tensor(0, data_offsets=lambda o: o[::-1])),
    "empty range for a non-empty shape": ("refuse", tensor(0, data_offsets=[0, 0])),
    "two tensors on the same bytes": ("refuse", same_bytes),
    "tensors overlapping": ("refuse", tensor(1, data_offsets=lambda o: [o[0] - 4, o[1] - 4])),
    "duplicate JSON key": ("refuse", duplicated),
    "shape one element too big": ("refuse", tensor(0, shape=lambda s: [*s[:-1], s[-1] + 1])),
    "shape one element too small": ("refuse", tensor(0, shape=lambda s: [*s[:-1], s[-1] - 1])),
    "negative dimensions, same product": ("refuse", tensor(0, shape=lambda s: [-n for n in s])),
    "dimensions whose product overflows 64 bits": ("refuse", tensor(0, shape=[2**33, 2**31])),
    "a dimension that is a float": ("refuse", tensor(0, shape=lambda s: [float(n) for n in s])),
    "transposed shape, same bytes": ("refuse", tensor(0, shape=lambda s: s[::-1])),
    "dtype in lower case": ("refuse", tensor(0, dtype="f32")),
    "unknown dtype": ("refuse", tensor(0, dtype="Q32")),
    "dtype torch lacks (F8_E8M0)": ("refuse", tensor(0, dtype="F8_E8M0", shape=as_bytes)),
    "integer tensor (I32) for a float weight": ("refuse", tensor(0, dtype="I32")),
    "BOOL tensor for a float weight": ("refuse", tensor(0, dtype="BOOL", shape=as_bytes)),
    "tensor entry that is a number": ("refuse", lambda h, d: st(h | {"x": 1}, d)),
    "tensor entry without dtype": ("refuse", tensor(0, dtype=None)),
    "tensor entry without data_offsets": ("refuse", tensor(0, data_offsets=None)),
    "tensor entry with an unknown field": ("either", tensor(0, extra=1)),
    "offsets as floats": ("refuse", tensor(0, data_offsets=lambda o: [float(x) for x in o])),
    "offsets as strings": ("refuse", tensor(0, data_offsets=lambda o: [str(x) for x in o])),
    "three offsets": ("refuse", tensor(0, data_offsets=lambda o: [*o, o[1]])),
    "non-string __metadata__ value": ("refuse", metadata({"x": 1})),
    "__metadata__ is a list": ("refuse", metadata(["x"])),
    "__metadata__ is null": ("either", metadata(None)),
    "__metadata__ aliases a missing key": ("either", metadata({"x": "y"})),
    "gap before the data": ("refuse", lambda h, d: st(shift(h, 4), bytes(4) + d)),
    "gap between two tensors": ("refuse", gap),
    "4 trailing bytes": ("refuse", lambda h, d: st(h, d + bytes(4))),
    "1 MiB of trailing bytes": ("refuse", lambda h, d: st(h, d + bytes(1 << 20))),
    "data truncated by 4 bytes": ("refuse", lambda h, d: st(h, d[:-4])),
    "header only, no data": ("refuse", lambda h, d: st(h, b"")),
    "empty file": ("refuse", lambda h, d: b""),
    "file of 3 bytes": ("refuse", lambda h, d: b"\x01\x00\x00"),
    "header length 0": ("refuse", lambda h, d: st(b"", b"")),
    "header length 1": ("refuse", lambda h, d: st(h, d, 1)),
    "header length 2**64-1": ("refuse", lambda h, d: st(h, d, 2**64 - 1)),
    "header length past the end of file": ("refuse", lambda h, d: st(h, d, len(raw(h) + d) + 1)),
    "header not JSON": ("refuse", lambda h, d: st(b"\x00garbage\xff", d)),
    "header not UTF-8": ("refuse", lambda h, d: st(b'{"\xff\xfe": 1}', d)),
    "header is a JSON list": ("refuse", lambda h, d: st(b"[]", d)),
    "header is JSON null": ("refuse", lambda h, d: st(b"null", d)),
    "header with garbage after the JSON": ("refuse", lambda h, d: st(raw(h) + b"x", d)),
    "header with a NUL in a key": ("refuse", lambda h, d: st(raw(h).replace(b'"', b'"\x00', 1), d)),
}  # fmt: skip


def rewrite(edit: Edit) -> Craft:
    def craft(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(edit(*split(path)))

    return craft


def tensors_of(edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Craft:
    """A valid file whose tensors (torch's, by name) are `edit`ed."""

    def craft(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = folder / "model.safetensors"
        save_file(edit(load_file(path)), path, metadata=split(path)[0].get("__metadata__"))

    return craft


def misaligned(folder: Path) -> None:
    """A 3-byte tensor first puts every float at an odd offset; the mapping drops it."""
    h, d = split(folder / "model.safetensors")
    pad = {"pad": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    (folder / "model.safetensors").write_bytes(st(pad | shift(h, 3), b"abc" + d))
    strategy(folder, state_dict_mapping={"key_transforms": {"pad": None}})


def strategy(folder: Path, **fields: Any) -> None:
    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    data["loading_strategy"] |= fields
    path.write_text(json.dumps(data))


def sharded(edit: Callable[[Path, dict[str, str]], Any] = lambda f, wmap: None) -> Craft:
    """The checkpoint split in a.safetensors and b.safetensors with an index, which `edit`
    may change: the weight map in place, or by returning the index's bytes (or a `replace`
    kind: "fifo")."""

    def craft(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = folder / "model.safetensors"
        tensors, aliases = load_file(path), split(path)[0].get("__metadata__")
        names = sorted(tensors)
        wmap = {k: "ab"[2 * i // len(names)] + ".safetensors" for i, k in enumerate(names)}
        for shard in ("a.safetensors", "b.safetensors"):
            part = {k: tensors[k] for k, s in wmap.items() if s == shard}
            save_file(part, folder / shard, metadata=aliases)
        path.unlink()
        if (data := edit(folder, wmap)) is None:
            data = json.dumps({"metadata": {}, "weight_map": wmap}).encode()
        if isinstance(data, str):
            fuzz.replace(folder / INDEX, data)
        else:
            (folder / INDEX).write_bytes(data)
        strategy(folder, required_files=["config.json", INDEX])

    return craft


def one_key(shard: str) -> Callable[[Path, dict[str, str]], None]:
    """Index edit: the first key said to be in `shard`."""
    return lambda folder, wmap: wmap.update({min(wmap): shard})


def both_shards(folder: Path, wmap: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    a, b = load_file(folder / "a.safetensors"), load_file(folder / "b.safetensors")
    save_file(b | {min(a): a[min(a)]}, folder / "b.safetensors")


def in_subfolder(folder: Path, wmap: dict[str, str]) -> None:
    (folder / "sub").mkdir()
    (folder / "a.safetensors").rename(folder / "sub" / "a.safetensors")
    wmap.update({k: f"sub/{s}" for k, s in wmap.items() if s == "a.safetensors"})


def only_a(folder: Path, wmap: dict[str, str]) -> None:
    wmap.update(dict.fromkeys(wmap, "a.safetensors"))


def b_as_bin(folder: Path, wmap: dict[str, str]) -> None:
    wmap.update({k: "b.bin" for k, s in wmap.items() if s == "b.safetensors"})


def index_file(data: bytes | str) -> Callable[[Path, dict[str, str]], bytes | str]:
    return lambda folder, wmap: data


def first(edit: Callable[[Any], Any]) -> Craft:
    """A valid file whose first tensor (by name) is `edit`ed."""
    return tensors_of(lambda t: t | {min(t): edit(t[min(t)])})


def extra(n: int) -> Craft:
    return tensors_of(lambda t: t | {f"extra.{i}": t[max(t)][0].clone() for i in range(n)})


def replaced(kind: str) -> Craft:
    return lambda folder: fuzz.replace(folder / "model.safetensors", kind)


FOLDER: Final[dict[str, tuple[Expect, Craft]]] = {
    "F16 tensor among F32 weights": ("either", first(lambda v: v.half())),
    "every tensor F64": ("either", tensors_of(lambda t: {k: v.double() for k, v in t.items()})),
    "wrong shape (one row fewer)": ("refuse", first(lambda v: v[:-1].clone())),
    "scalar where a weight is": ("refuse", first(lambda v: v[0, 0].clone())),
    "missing key": ("refuse", tensors_of(lambda t: {k: v for k, v in t.items() if k != max(t)})),
    "extra key": ("refuse", extra(1)),
    "1000 extra keys": ("refuse", extra(1000)),
    "renamed key": ("refuse", tensors_of(lambda t: {k + "_" * (k == max(t)): t[k] for k in t})),
    "empty-string key": ("refuse", tensors_of(lambda t: t | {"": t[max(t)].clone()})),
    "floats at odd offsets after a 3-byte tensor the mapping drops (valid)": ("ok", misaligned),
    "model.safetensors is a FIFO": ("refuse", replaced("fifo")),
    "model.safetensors is a directory": ("refuse", replaced("directory")),
    "model.safetensors is a symlink loop": ("refuse", replaced("symlink loop")),
    "model.safetensors is a dangling symlink": ("refuse", replaced("dangling symlink")),
    "model.safetensors is a symlink to /dev/zero": ("refuse", replaced("/dev/zero")),
    "model.safetensors is missing": ("refuse", lambda f: (f / "model.safetensors").unlink()),
    "two shards and an index (valid)": ("ok", sharded()),
    "a shard in a subfolder (valid)": ("ok", sharded(in_subfolder)),
    "key in two shards": ("refuse", sharded(both_shards)),
    "index names a missing shard": ("refuse", sharded(one_key("missing.safetensors"))),
    "index shard '../x.safetensors'": ("refuse", sharded(one_key("../x.safetensors"))),
    "index shard 'a//b.safetensors'": ("refuse", sharded(one_key("a//b.safetensors"))),
    "index shard '/abs.safetensors'": ("refuse", sharded(one_key("/abs.safetensors"))),
    "index shard 'sub/../a.safetensors'": ("refuse", sharded(one_key("sub/../a.safetensors"))),
    "index shard with a NUL": ("refuse", sharded(one_key("a\x00.safetensors"))),
    "index shard 's3://b/a.safetensors'": ("refuse", sharded(one_key("s3://b/a.safetensors"))),
    "index maps a key to the other shard (valid)": ("either", sharded(one_key("b.safetensors"))),
    "index omits the shard of half the keys": ("refuse", sharded(only_a)),
    "index names a .bin shard for half the keys": ("refuse", sharded(b_as_bin)),
    "index is not JSON": ("refuse", sharded(index_file(b"\x00garbage"))),
    "index is an empty file": ("refuse", sharded(index_file(b""))),
    "index weight_map is a list": ("refuse", sharded(index_file(b'{"weight_map": [1]}'))),
    "index without weight_map": ("refuse", sharded(index_file(b"{}"))),
    "index is a FIFO": ("refuse", sharded(index_file("fifo"))),
}  # fmt: skip


def true_manifest(folder: Path) -> None:
    """Keep the manifest true for the regular files it lists (drop the others), so a size or
    hash check does not hide what a crafted file does."""
    from wmtp.save import file_manifest

    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    names = [n for n in data.get("files") or {} if (folder / n).is_file()]
    names = [n for n in names if not (folder / n).is_symlink()]
    data["files"] = msgspec.to_builtins(file_manifest(str(folder), names))
    path.write_text(json.dumps(data))


def refusal(folder: Path) -> str:
    """Why safetensors' own reader refuses a checkpoint file of `folder` ("" if it does not)."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as e:
                return f"{path.name}: {e}"
    return ""


def crafted(base: Path, work: Path) -> list[Case]:
    """Each crafted checkpoint in a copy of `base`, fed to load, check, inspect and the CLI."""
    crafts = {name: (e, rewrite(edit)) for name, (e, edit) in HEADER.items()} | FOLDER
    cases = []
    for i, (name, (expect, craft)) in enumerate(crafts.items()):
        folder = work / "crafted" / f"{i:03d}"

        def make(folder: Path = folder, craft: Craft = craft) -> list[Run]:
            shutil.copytree(base, folder)
            craft(folder)
            true_manifest(folder)
            at = str(folder)
            runs: list[Run] = [("load", api_load, (at, at)), ("check", api_check, (at,))]
            runs += [("inspect", api_inspect, (at,)), ("cli check", api_cli, (["check", at],))]
            return [*runs, ("cli inspect", api_cli, (["inspect", at],))]

        naming = (*SHARDS, INDEX, *KEYS)
        cases.append(Case("crafted safetensors", name, make, naming, expect, folder))
    return cases


def fuzzed(models: Mapping[str, Path], work: Path, count: int, seed: int) -> list[Case]:
    """`count` distinct mutations of metadata.json and config.json (tests/test_fuzz.py's
    space) drawn by `random.Random(seed)`: a longer run starts with the same cases."""
    docs, rng, found = fuzz.valid_docs(models), random.Random(seed), dict[str, tuple[str, Any]]()
    for _ in range(100 * count):  # duplicates are drawn again
        model, edits = fuzz.draw_case(rng.choice, docs)
        found.setdefault(fuzz.describe(model, edits), (model, edits))
        if len(found) == count:
            break
    cases = []
    for i, (name, (model, edits)) in enumerate(found.items()):
        folder = work / "fuzz" / f"{i:03d}-{model}"

        def make(folder: Path = folder, model: str = model, edits: Any = edits) -> list[Run]:
            shutil.copytree(models[model], folder)
            location = fuzz.apply(folder, edits)
            return [("load", api_load, (location, str(folder))), ("check", api_check, (location,))]

        given = [fuzz.apply(folder, [m]) for m in edits if m.file == "location"]  # no I/O
        naming = {m.file for m in edits if m.file != "location"} | {"empty" for g in given if not g}
        naming |= {s for g in given for s in (g, repr(g)[1:-1])}  # the location, as is or quoted
        naming |= {fuzz.jsonpath(m.path)[2:] for m in edits if m.path}  # wmtp writes `$.a.b[0]`
        family, title = "fuzzed metadata/config", f"fuzz {i:03d} {name}"
        cases.append(Case(family, title, make, tuple(sorted(naming)), "either", folder))
    return cases


# Command lines: expect | strings that name the offence | the command, where GOOD is a model,
# S3 an s3:// location on a closed port (with its options), HTTP the same over http://,
# NOPE a missing folder, FILE a file, LYING a model whose manifest lies, EMPTY "".
COMMANDS: Final = """
refuse | bogus | load GOOD --device bogus
refuse | cuda | load GOOD --device cuda:0
refuse | meta | load GOOD --device meta
refuse | int8 | load GOOD --dtype int8
refuse | nonsense | load GOOD --dtype nonsense
refuse | '' | load GOOD --dtype EMPTY
refuse | complex64 | load GOOD --dtype complex64
either | float8 | load GOOD --dtype float8_e4m3fn
ok | - | load GOOD --dtype torch.float16
either | max_retries | check GOOD -o max_retries=abc
refuse | max_retries,abc | check S3 -o max_retries=abc
refuse | retry_timeout,x | check S3 -o retry_timeout=x
refuse | retry_timeout | check S3 -o retry_timeout=-1
refuse | unknown_key | check S3 -o unknown_key=1
refuse | allow_http,maybe | check S3 -o allow_http=maybe
refuse | timeout,soon | check S3 -o timeout=soon
refuse | noequals | inspect GOOD -o noequals
refuse | NOPE | load NOPE
refuse | NOPE | check NOPE
refuse | NOPE | inspect NOPE
refuse | NOPE | load NOPE --json
refuse | s3://bucket/model | load S3
refuse | s3://bucket/model | check S3
refuse | s3://bucket/model | inspect S3
refuse | 127.0.0.1:9 | load HTTP
refuse | foo://x | load foo://x
refuse | foo://x | check foo://x
refuse | foo://x | inspect foo://x
either | FILE/c | load GOOD --cache-dir FILE/c
refuse | FILE/c,s3://bucket/model | load S3 --cache-dir FILE/c
refuse | '',empty | load EMPTY
refuse | '',empty | check EMPTY
refuse | '',empty | inspect EMPTY
refuse | FILE | load FILE
refuse | FILE | check FILE
refuse | model.safetensors | check LYING --verify-hashes
refuse | bogus | resolve rho1-wmtp GOOD --role bogus
refuse | '' | resolve EMPTY GOOD
refuse | locations | resolve rho1-wmtp
refuse | location | load
refuse | frobnicate | frobnicate GOOD
"""


def options(models: Mapping[str, Path], work: Path) -> list[Case]:
    """Command lines (and two `load` calls) to refuse with a message, not a traceback."""
    good = str(models["gpt2_reference"])
    shutil.copytree(good, lying := work / "lying")
    builders.set_manifest(lying, "model.safetensors", sha256="0" * 64)
    words = {"GOOD": [good], "S3": S3, "NOPE": [str(work / "nope")], "LYING": [str(lying)]}
    words |= {"HTTP": ["http://127.0.0.1:9/m", "-o", "allow_http=true", "-o", "max_retries=0"]}
    words |= {"FILE": [f"{good}/config.json"], "FILE/c": [f"{good}/config.json/c"], "EMPTY": [""]}
    cases, family = [], "CLI and load options"
    for line in COMMANDS.strip().splitlines():
        expect, naming, command = (part.strip() for part in line.split("|"))
        argv = [w for word in command.split() for w in words.get(word, [word])]
        named = tuple(w for n in naming.split(",") if n != "-" for w in words.get(n, [n]))
        runs: list[Run] = [("cli", api_cli, (argv,))]
        cases.append(Case(family, command, fixed(runs), named, msgspec.convert(expect, Expect)))
    calls: list[tuple[str | None, str | None, Expect]] = [("meta", None, "refuse")]
    for device, dtype, expect in [*calls, (None, "float16", "ok")]:
        runs = [("load", api_load, (good, good, dtype, device))]
        name = f"api: load(GOOD, {dtype=}, {device=})"
        cases.append(Case(family, name, fixed(runs), ("meta",), expect))
    return cases


def fixed(runs: Sequence[Run]) -> Callable[[], Sequence[Run]]:
    """`make` for a case that needs no folder of its own."""
    return lambda: runs


# resolve("critic-wmtp"): name | the candidates in order | role (-: base_model) | the answer.
# GOOD is a base model, REWARD a reward model; FIFO, LOOP, DIR, GARBAGE, ZERO are folders whose
# metadata.json is a FIFO, a symlink loop, a directory, binary garbage, a link to /dev/zero;
# BARE has none.
CANDIDATES: Final = """
a later candidate's metadata.json is a FIFO | GOOD FIFO | - | GOOD
an earlier candidate's metadata.json is a FIFO | FIFO GOOD | - | GOOD
metadata.json is a symlink loop | LOOP GOOD | - | GOOD
metadata.json is a directory | DIR GOOD | - | GOOD
metadata.json is binary garbage | GARBAGE GOOD | - | GOOD
metadata.json is a symlink to /dev/zero | ZERO GOOD | - | GOOD
a folder without metadata.json | BARE GOOD | - | GOOD
a nonexistent folder | NOPE GOOD | - | GOOD
unknown scheme foo://x | foo://x GOOD | - | GOOD
s3 on a closed port | s3://bucket/model GOOD | - | GOOD
no candidate qualifies | LOOP foo://x DIR GARBAGE | - | -
role reward_model, a base model first | GOOD REWARD | reward_model | REWARD
"""


def candidates(models: Mapping[str, Path], work: Path) -> list[Case]:
    """`resolve` (the API and the CLI) over candidates that cannot be read."""
    words = {"GOOD": str(models["mtp"]), "REWARD": str(models["distilbert_reward"])}
    words |= {"NOPE": str(work / "nope"), "BARE": str(work / "candidates" / "bare")}
    (work / "candidates" / "bare").mkdir(parents=True)
    kinds = {"FIFO": "fifo", "LOOP": "symlink loop", "DIR": "directory", "ZERO": "/dev/zero"}
    for word, kind in (kinds | {"GARBAGE": "garbage"}).items():
        (folder := work / "candidates" / word.lower()).mkdir()
        fuzz.replace(folder / "metadata.json", kind)
        words[word] = str(folder)
    cases = []
    for line in CANDIDATES.strip().splitlines():
        name, paths_text, role_text, want_text = (part.strip() for part in line.split("|"))
        paths = [words.get(w, w) for w in paths_text.split()]
        role = "base_model" if role_text == "-" else role_text  # the CLI's default: every role
        want = None if want_text == "-" else words[want_text]
        opts = S3_OPTIONS if "s3://bucket/model" in paths else None
        argv = ["resolve", "critic-wmtp", *paths, "--json", "--role", role]
        argv += [a for k, v in (opts or {}).items() for a in ("-o", f"{k}={v}")]
        runs: list[Run] = [("resolve", api_resolve, ("critic-wmtp", paths, role, opts, want))]
        runs.append(("cli resolve", api_cli, (argv,)))
        naming = tuple(p for p in paths if p not in (words["GOOD"], words["REWARD"]))
        expect: Expect = "ok" if want else "refuse"
        cases.append(Case("resolve candidates", name, fixed(runs), naming, expect))
    return cases


# save: its arguments, its destination, its model, and a save killed over a model.

SAVE: Final = {"wmtp_type": "base_model", "algorithm_compatibility": ["baseline-mtp"]}


@contextlib.contextmanager
def environ(changes: Mapping[str, str | None]) -> Any:
    """The child's environment with `changes` (None: unset), restored after."""
    old = {k: os.environ.get(k) for k in changes}
    try:
        setenv(changes)
        yield
    finally:
        setenv(old)


def setenv(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def small_model(kind: str) -> Any:
    """A small GPT-2 to save: plain, on the meta device, or of a class defined in no file
    (as `python -c` or a notebook defines it: a `__main__` without a file)."""
    import torch

    config = builders.fixture_config("distilgpt2", **builders.GPT2_SHRINK_ALL)
    if kind == "meta":
        with torch.device("meta"):
            return builders.hf_model("AutoModelForCausalLM", config)
    model = builders.hf_model("AutoModelForCausalLM", config)
    if kind == "interactive":
        model.__class__ = type("Interactive", (type(model),), {"__module__": "__main__"})
    return model


def differs(model: Any, folder: Path) -> str:
    """What differs between `model` and the checkpoint in `folder` ("" if nothing)."""
    import torch
    from safetensors.torch import load_file

    state = model.state_dict()
    for key, tensor in load_file(folder / "model.safetensors").items():
        if key not in state or not torch.equal(state[key], tensor):
            return f"{key} is not the checkpoint's"
    return ""


def api_save(dest: str, args: dict[str, Any], kind: str, home: str) -> Answer:
    """`wmtp.save(model, dest, **args)` run from an empty folder under `home` ($HOME), then
    the saved folder loaded back: ok when it equals the model and lies where `dest` says."""
    import sys
    import types

    import wmtp

    model, cwd, main = small_model(kind), Path(home) / "cwd", sys.modules["__main__"]
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        sys.modules["__main__"] = types.ModuleType("__main__")
        with environ({"HOME": home}), contextlib.chdir(cwd):
            wmtp.save(model, dest, **(SAVE | args))
            where = Path(os.path.expanduser(dest)).absolute()  # noqa: PTH111 (as load reads it)
            if any(cwd.iterdir()):
                return 0, "", f"wrote into {cwd}: {sorted(p.name for p in cwd.iterdir())}"
            return 0, str(where), differs(wmtp.load(str(where)), where)
    finally:
        sys.modules["__main__"] = main


def api_killed_save(folder: str, where: str) -> Answer:
    """A save over the model in `folder` killed (SIGKILL) when it reaches `where` (a name in
    wmtp.save), then `wmtp.load(folder)`: it must fail, naming metadata.json."""
    import importlib
    import signal

    import wmtp

    model, (read, write) = builders.mtp_model(seed=1), os.pipe()
    if (pid := os.fork()) == 0:  # the child stops in the save and waits to be killed
        try:
            os.close(read)
            module = importlib.import_module("wmtp.save")

            def stall(*args: Any, **kwargs: Any) -> None:
                os.write(write, b"x")
                time.sleep(600)

            setattr(module, where, stall)
            module.save(model, folder, **SAVE)  # no obstore call before either stop
        finally:
            os._exit(1)
    os.close(write)
    stalled = os.read(read, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read)
    if not stalled:
        return 1, "the save never reached " + where, ""
    import torch

    loaded, new = (
        wmtp.load(folder, trust_code=True, progress=False).state_dict(),
        model.state_dict(),
    )
    what = "new weights" if all(torch.equal(t, new[k]) for k, t in loaded.items()) else "a model"
    return 0, "", f"load returned {what} under the old metadata.json after a save was killed"


def read_only(folder: Path, stack: contextlib.ExitStack) -> bool:
    """Make `folder` unwritable, root included (chattr +i), until `stack` closes; False when
    this file system cannot."""
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        stack.callback(folder.chmod, 0o755)
        return True
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        return False
    stack.callback(subprocess.run, ["chattr", "-i", str(folder)], check=False)
    return True


def saves(models: Mapping[str, Path], work: Path, stack: contextlib.ExitStack) -> list[Case]:
    """`save` given arguments the metadata cannot hold, destinations it cannot write, models
    it cannot save, and killed over a model."""
    root, home = work / "save", str(work / "save" / "home")
    builders.save_gpt2_reference(locked := root / "read-only")
    (file := root / "file").write_text("x")
    dests: list[tuple[Expect, str, Path | str, tuple[str, ...]]] = [
        ("refuse", "an empty destination", "", ("empty",)),
        ("refuse", "a file", file, (str(file),)),
        ("refuse", "a path under a file", file / "m", (str(file / "m"),)),
        ("refuse", "/proc/x", "/proc/x", ("/proc/x",)),
        ("ok", "~/m (expanded)", "~/m", ()),
        ("ok", "a new folder (valid)", root / "new", ()),
        ("ok", "over a saved model (valid)", root / "again", ()),
    ]
    builders.save_gpt2_reference(root / "again")
    if read_only(locked, stack):
        dests += [("refuse", "a read-only folder holding a model", locked, (str(locked),))]
        dests += [("refuse", "a new folder in a read-only one", locked / "m", (str(locked),))]
    family, cases = "save: destinations, arguments, models", []
    for expect, name, dest, naming in dests:
        runs: list[Run] = [("save", api_save, (str(dest), {}, "plain", home))]
        cases.append(Case(family, f"destination: {name}", fixed(runs), naming, expect))
    bad: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
        ("algorithm_compatibility a string", {"algorithm_compatibility": "baseline-mtp"},
         ("algorithm_compatibility",)),
        ("wmtp_type bogus_model", {"wmtp_type": "bogus_model"}, ("'reference_model'",)),
        ("wmtp_type None", {"wmtp_type": None}, ("wmtp_type",)),
        ("training_algorithm 5", {"training_algorithm": 5}, ("training_algorithm",)),
        ("algorithm_compatibility [5]", {"algorithm_compatibility": [5]},
         ("algorithm_compatibility",)),
        ("transformers_class ''", {"transformers_class": ""}, ("transformers_class",)),
    ]  # fmt: skip
    for name, args, naming in bad:
        runs = [("save", api_save, (str(root / "args"), args, "plain", home))]
        cases.append(Case(family, f"argument: {name}", fixed(runs), naming))
    for kind, named in [("meta", "meta device"), ("interactive", "Interactive")]:
        runs = [("save", api_save, (str(root / kind), {}, kind, home))]
        title = {"meta": "on the meta device", "interactive": "a class from `python -c`"}[kind]
        cases.append(Case(family, f"model: {title}", fixed(runs), (named,)))
    for where, when in [("_write", "at its first file"), ("file_manifest", "after the weights")]:
        folder = root / f"killed-{where}"
        shutil.copytree(models["mtp"], folder)
        runs = [("save", api_killed_save, (str(folder), where))]
        cases.append(Case(family, f"killed {when}, over a model", fixed(runs), ("metadata.json",)))
    return cases


# storage_options of the wrong type, and AWS files that do not parse (an s3:// location on a
# closed port: nothing is ever reached).


def api_options(location: str, options: Any, env: dict[str, str | None]) -> Answer:
    import wmtp
    from wmtp import remote

    remote._boto3_provider.cache_clear()
    with environ(env):
        wmtp.load(location, storage_options=options, progress=False)
    return 0, "", "loaded a model from a closed port"


def api_cli_env(argv: list[str], env: dict[str, str | None]) -> Answer:
    from wmtp import remote

    remote._boto3_provider.cache_clear()
    with environ(env):
        return api_cli(argv)


def storage(work: Path) -> list[Case]:
    """`storage_options` that are no mapping of strings, and AWS profiles in broken files."""
    url, family = "s3://bucket/model", "storage options"
    flat: list[tuple[str, Any, tuple[str, ...]]] = [
        ("a string", "region=us-east-1", ("storage_options", "region=us-east-1")),
        ("a list", ["region"], ("storage_options",)),
        ("region 5", S3_OPTIONS | {"region": 5}, ("'region'",)),
        ("region None", S3_OPTIONS | {"region": None}, ("'region'",)),
        ("endpoint as bytes", S3_OPTIONS | {"endpoint": b"http://127.0.0.1:9"}, ("'endpoint'",)),
        ("a key that is a number", {5: "x"}, ("5",)),
        ("a prefix's value None", {"s3://bucket/": {"region": None}}, ("'region'",)),
        ("a prefix's options a string", {"s3://bucket/": "region=x"}, ("s3://bucket/",)),
        ("allow_http as aws_allow_http", S3_OPTIONS | {"aws_allow_http": "true"}, (url,)),
        ("max_retries as the number 0 (valid)", S3_OPTIONS | {"max_retries": 0}, (url,)),
    ]
    cases = []
    for name, options, naming in flat:
        runs: list[Run] = [("load", api_options, (url, options, {}))]
        cases.append(Case(family, f"storage_options: {name}", fixed(runs), naming))
    (aws := work / "aws").mkdir()
    good = "[p]\naws_access_key_id = a\naws_secret_access_key = b\n"
    for broken in ("config", "credentials"):
        files = {"credentials": aws / f"{broken}-credentials", "config": aws / f"{broken}-config"}
        files["credentials"].write_text(good)
        files["config"].write_text("[profile p]\nregion = us-east-1\n")
        files[broken].write_text("[p\nthis is no INI file\n")
        env: dict[str, str | None] = {"AWS_CONFIG_FILE": str(files["config"]),
               "AWS_SHARED_CREDENTIALS_FILE": str(files["credentials"]), "AWS_PROFILE": None,
               "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}  # fmt: skip
        options = {k: v for k, v in S3_OPTIONS.items() if "access" not in k}
        runs = [("load", api_options, (url, options | {"profile": "p"}, env))]
        argv = ["check", url, *(a for k, v in options.items() for a in ("-o", f"{k}={v}"))]
        runs.append(("cli", api_cli_env, (argv, env | {"AWS_PROFILE": "p"})))
        naming = (str(files[broken]),)
        cases.append(Case(family, f"AWS {broken} file that does not parse", fixed(runs), naming))
    return cases


# The download cache across two servers: a mirror that answers with the real server's ETags
# must never have its files (or its modeling.py) used for the real server, whichever of
# obstore's names gives the endpoint.

ENDPOINTS: Final = ["endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url",
                    "AWS_ENDPOINT_URL", "env AWS_ENDPOINT_URL", "env AWS_ENDPOINT"]  # fmt: skip


def api_servers(url: str, alias: str, mirror: str, real: str, cache: str, want: str) -> Answer:
    """Load `url` from `mirror`, then from `real` (`alias` giving the endpoint), one cache."""
    import wmtp

    options = {k: v for k, v in S3_OPTIONS.items() if k != "endpoint"}
    loaded = []
    for endpoint in (mirror, real):
        env: dict[str, str | None] = {"AWS_ENDPOINT_URL": None, "AWS_ENDPOINT": None}
        given = dict(options)
        if alias.startswith("env "):
            env[alias.removeprefix("env ")] = endpoint
        else:
            given[alias] = endpoint
        with environ(env):
            loaded.append(wmtp.load(url, storage_options=given, cache_dir=cache, trust_code=True))
    if wrong := differs(loaded[1], Path(want)):
        return 0, "", f"the real server's load returned the mirror's weights ({wrong})"
    folders = {p.parent.parent for p in Path(cache).rglob("model.safetensors")}
    return 0, "", "" if len(folders) == 2 else "one cache folder for two servers"


def servers(models: Mapping[str, Path], work: Path, stack: contextlib.ExitStack) -> list[Case]:
    """Two S3 servers on 127.0.0.1 that give each file the same ETag: the real model, and a
    mirror's other weights (same sizes, same modeling.py)."""
    from tests.s3mirror import start_mirror

    other = builders.save_mtp(work / "servers" / "mirror", seed=1)
    real: dict[str, tuple[bytes, str]] = {}
    fake: dict[str, tuple[bytes, str]] = {}
    for path in sorted(models["mtp"].iterdir()):
        etag = f'"{hashlib.md5(path.read_bytes()).hexdigest()}"'  # as S3 gives it
        real[f"bucket/m/{path.name}"] = (path.read_bytes(), etag)
        fake[f"bucket/m/{path.name}"] = ((other / path.name).read_bytes(), etag)
    mirrors = [start_mirror(fake), start_mirror(real)]
    for server in mirrors:
        stack.callback(server.shutdown)
    cases = []
    for alias in ENDPOINTS:
        cache = str(work / "servers" / "cache" / alias.replace(" ", "-"))
        args = ("s3://bucket/m", alias, *(m.endpoint for m in mirrors), cache, str(models["mtp"]))
        runs: list[Run] = [("load", api_servers, args)]
        cases.append(Case("cache across servers", f"endpoint by {alias}", fixed(runs), (), "ok"))
    return cases


# Arguments of load, resolve and load_roles, and model folders that fight back. Each API below
# runs in the sandbox's child; GOOD is a base model, REF a reference model.


def api_overrides(location: str, overrides: Any) -> Answer:
    import wmtp

    wmtp.load(location, config_overrides=overrides)
    return 0, "", ""


def api_roles(algo: Any, paths: Any, roles: Any, options: dict[str, Any]) -> Answer:
    import wmtp

    loaded = wmtp.load_roles(algo, paths, roles=roles, **options)
    frozen = {r: not any(p.requires_grad for p in m.parameters()) for r, m in loaded.items()}
    wrong = [r for r, f in frozen.items() if f != (r != "base_model")]
    return 0, ", ".join(sorted(loaded)), f"frozen wrongly: {wrong}" if wrong else ""


def api_resolve_one(algo: str, path: Any) -> Answer:
    import wmtp

    return 0, wmtp.resolve(algo, path), ""


def api_parallelize(location: str, folder: str, how: str) -> Answer:
    import wmtp

    functions = {
        "adds": builders.parallelize_adding_a_buffer,
        "removes": builders.parallelize_removing_a_block,
        "nothing": lambda model: None,
    }
    model = wmtp.load(location, parallelize=functions[how])
    return 0, "", differs(model, Path(folder))


def arguments(models: Mapping[str, Path], work: Path) -> list[Case]:
    """Arguments of the wrong kind to load, resolve and load_roles; folders whose files cannot
    be read or whose module exits; a parallelize that changes what the model holds."""
    good, ref = str(models["mtp"]), str(models["gpt2_reference"])
    both, family = [good, ref], "load, resolve and load_roles arguments"
    calls: list[tuple[str, Callable[..., Answer], tuple[Any, ...], tuple[str, ...], Expect]] = [
        (
            "config_overrides as pairs",
            api_overrides,
            (good, [("n_layer", 2)]),
            ("config_overrides",),
            "refuse",
        ),
        (
            "config_overrides as a string",
            api_overrides,
            (good, "n_layer=2"),
            ("config_overrides",),
            "refuse",
        ),
        ("config_overrides as a number", api_overrides, (good, 5), ("config_overrides",), "refuse"),
        (
            "resolve with one path, not a list",
            api_resolve_one,
            ("baseline-mtp", good),
            ("paths",),
            "refuse",
        ),
        ("resolve with a Path", api_resolve_one, ("baseline-mtp", [Path(good)]), (), "ok"),
        ("load_roles roles=[]", api_roles, ("rho1-wmtp", both, [], {}), ("roles",), "refuse"),
        ("load_roles algo=None", api_roles, (None, both, None, {}), ("algo",), "refuse"),
        (
            "load_roles one path, not a list",
            api_roles,
            ("rho1-wmtp", good, None, {}),
            ("paths",),
            "refuse",
        ),
        (
            "load_roles dtpye= (misspelt)",
            api_roles,
            ("rho1-wmtp", both, None, {"dtpye": "bf16"}),
            ("dtpye",),
            "refuse",
        ),
        (
            "load_roles dtype for a role not loaded",
            api_roles,
            ("rho1-wmtp", both, None, {"dtype": {"reward_model": "bf16"}}),
            ("reward_model",),
            "refuse",
        ),
        (
            "load_roles dtype per role",
            api_roles,
            ("rho1-wmtp", both, None, {"dtype": {"reference_model": "bf16"}}),
            (),
            "ok",
        ),
        ("parallelize adds a buffer", api_parallelize, (ref, ref, "adds"), ("steps",), "refuse"),
        (
            "parallelize removes a block",
            api_parallelize,
            (ref, ref, "removes"),
            ("transformer.h.1",),
            "refuse",
        ),
        ("parallelize that shards nothing", api_parallelize, (ref, ref, "nothing"), (), "ok"),
    ]
    cases = [Case(family, n, fixed([("load", f, a)]), named, e) for n, f, a, named, e in calls]
    folders = {
        "a required file name of 300 characters": (
            "x" * 300,
            lambda f: strategy(
                f, required_files=["config.json", "model.safetensors", "modeling.py", "x" * 300]
            ),
        ),
        "model.safetensors is /proc/self/mem (EIO)": (
            "model.safetensors",
            lambda f: (
                (f / "model.safetensors").unlink(),
                (f / "model.safetensors").symlink_to("/proc/self/mem"),
            ),
        ),
        "a replacement naming an unknown group": (
            "key_transforms",
            lambda f: strategy(f, state_dict_mapping={"key_transforms": {"(a)": "\\g<x>"}}),
        ),
        "modeling.py calls sys.exit(0)": (
            "modeling.py",
            lambda f: (f / "modeling.py").write_text("import sys\nsys.exit(0)\n"),
        ),
    }
    for name, (naming, edit) in folders.items():
        folder = work / "arguments" / name.split()[0] / str(len(cases))

        def make(folder: Path = folder, edit: Callable[[Path], Any] = edit) -> Sequence[Run]:
            shutil.copytree(good, folder)
            edit(folder)
            meta = json.loads((folder / "metadata.json").read_text())
            meta.pop("files", None)  # the read itself must fail, not a manifest check first
            (folder / "metadata.json").write_text(json.dumps(meta))
            return [("load", api_load, (str(folder), good)), ("check", api_check, (str(folder),))]

        cases.append(Case("model folders that fight back", name, make, (naming,), folder=folder))
    return cases


def judge(
    api: str, outcome: sandbox.Outcome, refused: str, load: Verdict | None
) -> tuple[Verdict, str]:
    """The verdict of one run, and what to show of it."""
    if outcome.kind == "hang":
        return "hang", outcome.message
    if outcome.kind == "other_exception":
        return "other", ""
    if outcome.kind == "wmtp_error":
        return ("clear" if outcome.named else "unnamed"), ""
    code, text, wrong = outcome.result
    if wrong:
        return "wrong", wrong
    if code != 0:
        return ("other" if "Traceback" in text else "clear" if outcome.named else "unnamed"), text
    if refused:
        return "wrong", f"passed, but safetensors refuses {refused}"
    if load not in (None, "ok", "wrong") and api.endswith("check"):
        return "wrong", f"no problem found, but load {'hangs' if load == 'hang' else 'fails'}"
    return "ok", text


def note(r: Result, load: Verdict | None) -> str:
    """Why a run is listed ("": it is not): all but clear refusals and expected oks."""
    if r.verdict not in ("ok", "clear"):
        return COLUMNS[r.verdict]
    if r.verdict == "ok" and r.expect == "refuse" and "inspect" not in r.api:  # it shows headers
        return "accepted, though a refusal was expected"
    if r.verdict == "clear" and r.expect == "ok":
        return "refused a valid input"
    if r.verdict == "clear" and r.api.endswith("check") and load == "ok":
        return "check reports a problem, but load succeeds"
    return ""


def run(cases: Sequence[Case], deadline: float, work: Path, keep: bool) -> list[Result]:
    """Every run of every case, in order (`load` first, whose verdict `check` is judged by)."""
    results: list[Result] = []
    for n, case in enumerate(cases, 1):
        runs = case.make()
        refused = refusal(case.folder) if case.folder else ""
        load: Verdict | None = None
        for api, function, args in runs:
            start = time.perf_counter()
            outcome = sandbox.run(function, *args, deadline=deadline, naming=case.naming)
            seconds = round(time.perf_counter() - start, 3)
            verdict, shown = judge(api, outcome, refused, load)
            load = verdict if api == "load" else load
            shown = " | ".join(line for line in shown.splitlines() if line.strip())[:400]
            message, detail = (s.replace(str(work), "<work>") for s in (outcome.message, shown))
            r = Result(case.family, case.name, api, case.expect, verdict, outcome.type, message,
                       outcome.where, detail, "", seconds)  # fmt: skip
            results.append(msgspec.structs.replace(r, note=note(r, load)))
        if case.folder and not keep:
            shutil.rmtree(case.folder, ignore_errors=True)
        if n % 100 == 0:
            print(f"  {n} of {len(cases)} {case.family} cases", file=sys.stderr)
    return results


def table(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Counts of each verdict per inputs and API, and in all."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        zero = {"inputs": r.family, "API": r.api, "cases": 0} | dict.fromkeys(COLUMNS.values(), 0)
        row = rows.setdefault((r.family, r.api), zero)
        row["cases"] += 1
        row[COLUMNS[r.verdict]] += 1
    total = {k: sum(row[k] for row in rows.values()) for k in ("cases", *COLUMNS.values())}
    return [*rows.values(), {"inputs": "**all**", "API": ""} | total]


def markdown(rows: Sequence[dict[str, Any]], results: Sequence[Result], title: str) -> str:
    lines = [title, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(str, row.values())) + " |" for row in rows]
    listed = sorted((r for r in results if r.note), key=lambda r: (r.note, r.type, r.message))
    lines += ["", f"## Runs neither a clear refusal nor an expected ok: {len(listed)}"]
    for group in sorted({r.note for r in listed}):
        lines += ["", f"### {group}", ""]
        for r in (r for r in listed if r.note == group):
            what = f"{r.type}: {r.message} ({r.where})" if r.type else r.detail
            lines.append(f"- {r.family} / {r.case} / `{r.api}`: {what}")
    lines += ["", "## resolve: what each list of candidates gets", ""]
    lines += [f"- {r.case}: {r.detail or r.message}" for r in results if r.api == "cli resolve"]
    if os.geteuid() == 0:
        lines += ["", "Not run: a candidate whose metadata.json is chmod 000 (root reads it)."]
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__)
    p.add_argument("--quick", action="store_true", help="150 fuzzed cases (not 670), 5 s deadline")
    p.add_argument("--out", help="path without suffix (default results/hostile[-quick])")
    p.add_argument("--only", default="", help="only the cases whose name holds this text")
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzzed cases")
    p.add_argument("--deadline", type=float, help="seconds a run may take (default 10 or 5)")
    p.add_argument("--workdir", help="work in this folder and keep every case's files")
    args = p.parse_args(argv)
    deadline, mode = args.deadline or (5.0 if args.quick else 10.0), ("full", "quick")[args.quick]
    out = Path(args.out or RESULTS / f"hostile{'-quick' * args.quick}")
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="wmtp-"))
        (work := Path(tmp)).mkdir(parents=True, exist_ok=True)
        # Before the sandbox's forkserver starts: its children inherit this environment.
        os.environ.update(QUIET, AWS_EC2_METADATA_DISABLED="true", PYTHONWARNINGS="ignore")
        os.environ["WMTP_CACHE_DIR"] = str(work / "cache")
        start = time.perf_counter()
        models = {name: getattr(builders, f"save_{name}")(work / name) for name in fuzz.FUZZED}
        seconds["build models"] = round(time.perf_counter() - start, 1)
        families: dict[str, Callable[[], list[Case]]] = {
            "crafted": lambda: crafted(models["gpt2_reference"], work),
            "fuzzed": lambda: fuzzed(models, work, 150 if args.quick else 670, args.seed),
            "options": lambda: options(models, work),
            "resolve": lambda: candidates(models, work),
            "save": lambda: saves(models, work, stack),
            "storage": lambda: storage(work),
            "servers": lambda: servers(models, work, stack),
            "arguments": lambda: arguments(models, work),
        }
        results: list[Result] = []
        for family, cases in families.items():
            begun = time.perf_counter()
            chosen = [c for c in cases() if args.only in c.name]
            results += run(chosen, deadline, work, keep=bool(args.workdir))
            seconds[family] = round(time.perf_counter() - begun, 1)
        sandbox.stop()
    seconds["total"] = round(time.perf_counter() - start, 1)
    rows = table(results)
    spent = ", ".join(f"{k} {v} s" for k, v in seconds.items())
    title = f"# wmtp on hostile inputs ({mode}: seed {args.seed}, deadline {deadline:g} s; {spent})"
    text = markdown(rows, results, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    report = {"mode": mode, "seed": args.seed, "deadline": deadline, "seconds": seconds}
    report |= {"table": rows, "results": results}
    out.with_suffix(".json").write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile inputs, one or more cases per class of the hardening issue: each must end in a
`WmtpError` whose message names the file, URL or JSON path (never another exception, a hang,
or a silently wrong model). Classes: 1 crafted safetensors, 2 dtypes, 3 key_transforms, 4 paths,
5 broken config.json, 6 auto_map, 7 temporary download files, 8 resolve, 9 file system and CLI.
The fuzzer over metadata and config.json is tests/test_fuzz.py."""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wmtp
from tests import builders
from tests.conftest import Copy
from tests.s3server import S3Server, storage_options, upload_folder
from wmtp.check import check, inspect_model
from wmtp.cli import main
from wmtp.remote import HOST, _locked

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
# name -> (header, bytes of data after the header)
CRAFTED: dict[str, tuple[dict[str, object], int]] = {
    "gap before the data": ({"a": {**F32_2, "data_offsets": [4, 12]}}, 12),
    "trailing bytes": ({"a": F32_2}, 12),
    "truncated data": ({"a": F32_2}, 4),
    "size not shape x dtype": ({"a": {**F32_2, "shape": [3]}}, 8),
    "overlapping tensors": ({"a": F32_2, "b": F32_2}, 8),
    "non-string __metadata__": ({"__metadata__": {"x": 1}, "a": F32_2}, 8),
    "unknown dtype": ({"a": {**F32_2, "dtype": "Q32"}}, 8),
    "duplicate key": ({}, 8),  # written by hand below: the JSON holds "a" twice
}


def craft(path: Path, header: dict[str, object], data: int, raw: bytes | None = None) -> None:
    """A safetensors file with this header (or raw header bytes) and `data` zero bytes."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_file_safetensors_refuses_is_refused_everywhere(
    case: str, models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy(models["gpt2_reference"])
    weights = folder / "model.safetensors"
    header, data = CRAFTED[case]
    raw = None
    if case == "duplicate key":  # the last "a" would win and point at the other bytes
        raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        raw += b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    craft(weights, header, data, raw)
    builders.refresh_manifest(folder, "model.safetensors")
    # The format's own reader refuses it too.
    with pytest.raises(Exception) as reference, safe_open(str(weights), framework="numpy"):
        pass
    assert type(reference.value).__name__ == "SafetensorError"
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert str(err.value).startswith(f"{weights}: "), err.value
    problems = check(str(folder)).problems
    assert len(problems) == 1 and problems[0].startswith(f"{weights}: "), problems
    with pytest.raises(wmtp.MetadataError):
        inspect_model(str(folder))
    for command in ("check", "inspect"):
        assert main([command, str(folder)]) == 1
        assert "Traceback" not in capsys.readouterr().err


def test_a_key_in_two_shards_is_refused(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    (folder / "b.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    keys = ["x"]
    index = {"weight_map": dict.fromkeys(keys, "a.safetensors") | {"y": "b.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    data = json.loads((folder / "metadata.json").read_text())
    data["loading_strategy"]["required_files"] = ["config.json", "model.safetensors.index.json"]
    data.pop("files")
    (folder / "metadata.json").write_text(json.dumps(data))
    with pytest.raises(wmtp.WeightsError, match=r"is stored twice: in .*a.safetensors and in"):
        wmtp.load(str(folder))


@pytest.mark.parametrize(
    ("shard", "words"),
    [("../x.safetensors", "without '..'"), ("/etc/x.safetensors", "a leading '/'")],
)
def test_shard_names_obey_the_path_rule(
    shard: str, words: str, models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    index = {"weight_map": {"x": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    data = json.loads((folder / "metadata.json").read_text())
    data["loading_strategy"]["required_files"] = ["config.json", "model.safetensors.index.json"]
    data.pop("files")
    (folder / "metadata.json").write_text(json.dumps(data))
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert message.startswith(f"{folder}/model.safetensors.index.json: not a shard index")
    assert "Expected `str` that is a path - at `$.weight_map[...]`" in message
    assert words in message


@pytest.mark.parametrize("path", [".", "./x", "a//b", "sub/..", "a\x00b", "s3://b/x", "C:x"])
def test_required_files_are_paths_inside_the_folder(path: str) -> None:
    data = json.loads((builders.EXAMPLES / "tiny-mtp" / "metadata.json").read_text())
    data["loading_strategy"]["required_files"].append(path)
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.decode_metadata(json.dumps(data).encode(), source="m/metadata.json")
    assert "$.loading_strategy.required_files[3]" in str(err.value)
    assert "relative to the model folder" in str(err.value)


def test_custom_module_file_must_be_python() -> None:
    data = json.loads((builders.EXAMPLES / "tiny-mtp" / "metadata.json").read_text())
    data["loading_strategy"]["custom_module_file"] = "config.json"
    with pytest.raises(wmtp.MetadataError, match=r"custom_module_file.*ends in .py"):
        wmtp.decode_metadata(json.dumps(data).encode(), source="m/metadata.json")


@pytest.mark.parametrize("template", [r"\q", r"\g<99>"])
def test_replacement_templates_are_checked_when_decoded(template: str) -> None:
    data = json.loads((builders.EXAMPLES / "tiny-mtp" / "metadata.json").read_text())
    data["loading_strategy"]["state_dict_mapping"]["key_transforms"] = {"(a)": template}
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.decode_metadata(json.dumps(data).encode(), source="m/metadata.json")
    assert "$.loading_strategy.state_dict_mapping" in str(err.value)


@pytest.mark.parametrize("dtype", ["int8", "torch.int64", "bool"])
def test_a_dtype_that_is_not_floating_point_is_refused(dtype: str, models: dict[str, Path]) -> None:
    with pytest.raises(wmtp.OptionError, match=r"unknown dtype .*integers are never cast"):
        wmtp.load(str(models["mtp"]), dtype=dtype)


def test_a_model_that_fails_to_build_names_config_and_class(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text())
    config["n_head"] = 0
    builders.write_text(folder, "config.json", json.dumps(config))
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert f"{folder}/config.json (AutoModelForCausalLM): building the model" in message
    assert err.value.__cause__ is not None


def test_download_lock_deletes_only_dead_owners_parts(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    live = tmp_path / f".model.safetensors.{HOST}~{os.getpid()}~aa.part"
    dead = tmp_path / f".model.safetensors.{HOST}~999999999~bb.part"  # no such process
    elsewhere = tmp_path / ".model.safetensors.other-host~999999999~cc.part"
    for part in (live, dead, elsewhere):
        part.write_bytes(b"partial")
    with _locked(dest):
        pass
    assert live.exists() and elsewhere.exists()
    assert not dead.exists()


@pytest.mark.parametrize("size", [0, 3])
def test_a_file_too_small_for_safetensors_is_named(
    size: int, models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy(models["gpt2_reference"])
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(size))
    builders.refresh_manifest(folder, "model.safetensors")
    with pytest.raises(wmtp.MetadataError, match=rf"{weights}: not a safetensors file \({size} "):
        wmtp.load(str(folder))
    assert check(str(folder)).problems[0].startswith(f"{weights}: not a safetensors file")
    assert main(["inspect", str(folder)]) == 1
    assert "Traceback" not in capsys.readouterr().err


# Class 2: dtypes are compared with the model's, with the shapes.


def _retyped(folder: Path, change: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Rewrite the checkpoint with some tensors in another dtype; returns the new tensors."""
    tensors = dict(load_file(folder / "model.safetensors"))
    tensors |= {key: tensors[key].to(dtype) for key, dtype in change.items()}
    builders.write_checkpoint(folder, tensors)
    return tensors


def test_an_integer_tensor_for_a_float_weight_is_refused(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    _retyped(folder, {"transformer.wpe.weight": torch.int32})
    for dtype in (None, "fp32"):  # a cast never turns integers into weights
        with pytest.raises(wmtp.WeightsError) as err:
            wmtp.load(str(folder), dtype=dtype)
        assert "dtype of 'transformer.wpe.weight': checkpoint int32, model float" in str(err.value)
    assert any("dtype of 'transformer.wpe.weight'" in p for p in check(str(folder)).problems)


def test_one_half_precision_tensor_among_float32_is_refused_unless_cast(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    tensors = _retyped(folder, {"transformer.ln_f.weight": torch.float16})
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert "dtype of 'transformer.ln_f.weight': checkpoint float16, model float32" in message
    assert "hint: pass dtype=" in message
    model = wmtp.load(str(folder), dtype="fp32")  # the cast the hint asks for
    state = model.state_dict()
    assert all(torch.equal(state[k], t.float()) for k, t in tensors.items() if k in state)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_a_checkpoint_in_one_other_float_type_loads_in_that_type(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    tensors = dict(load_file(folder / "model.safetensors"))
    tensors = _retyped(folder, dict.fromkeys(tensors, torch.bfloat16))
    state = wmtp.load(str(folder)).state_dict()
    assert all(torch.equal(state[k], t) for k, t in tensors.items() if k in state)
    assert check(str(folder)).problems == ()


# Class 3: key_transforms cannot hang the process.


def test_a_backtracking_pattern_is_stopped_with_its_json_path(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    mapping = {"key_transforms": {r"(.|..)+weight.": "x"}}  # exponential on every '...weight'
    builders.edit_metadata(folder, state_dict_mapping=mapping)
    started = time.monotonic()
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert time.monotonic() - started < 30  # Python's `re` would take years here
    assert "`$.loading_strategy.state_dict_mapping.key_transforms` '(.|..)+weight.'" in str(
        err.value
    )


# Classes 5 and 6: config.json that does not build, and code it would run.


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_head", 0), ("n_embd", 33), ("n_layer", "two"), ("vocab_size", -1)],
)
def test_a_config_that_does_not_build_names_config_and_class(
    field: str, value: object, models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text()) | {field: value}
    builders.write_text(folder, "config.json", json.dumps(config))
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)  # refused by the config class, or by the model class it builds
    assert message.startswith(f"{folder}/config.json"), message
    assert "transformers refuses this gpt2 config" in message or "(AutoModelForCausalLM)" in message
    assert err.value.__cause__ is not None


def test_a_custom_model_missing_its_config_field_names_config_and_class(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    config = json.loads((folder / "config.json").read_text())
    del config["mtp_config"]  # the model's own code reads config.mtp_config["n_future_tokens"]
    builders.write_text(folder, "config.json", json.dumps(config))
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert f"{folder}/config.json (" in str(err.value)


def test_auto_map_code_is_refused_never_run_nor_asked(
    models: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    builders.write_text(folder, "config.json", json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran')\n")

    def no_prompt(*args: object) -> str:
        raise AssertionError("asked on stdin")

    monkeypatch.setattr("builtins.input", no_prompt)
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert message.startswith(f"{folder}/config.json: `$.auto_map` would run")
    assert "'modeling_evil.Evil' for AutoModelForCausalLM" in message


# Class 8: resolve answers at the first fit and gives each failure its own reason.


def _special_candidates(tmp_path: Path) -> dict[str, str]:
    fifo, loop, folder = tmp_path / "fifo", tmp_path / "loop", tmp_path / "dir"
    for path in (fifo, loop, folder / "metadata.json"):
        path.mkdir(parents=True)
    os.mkfifo(fifo / "metadata.json")
    (loop / "metadata.json").symlink_to("metadata.json")
    return {"fifo": str(fifo), "loop": str(loop), "dir": str(folder), "scheme": "foo://x/m"}


def test_resolve_answers_before_a_later_fifo_and_names_each_failure(
    models: dict[str, Path], tmp_path: Path
) -> None:
    bad = _special_candidates(tmp_path)
    mtp = str(models["mtp"])
    assert wmtp.resolve("baseline-mtp", [mtp, bad["fifo"]]) == mtp
    assert wmtp.resolve("baseline-mtp", [*bad.values(), mtp]) == mtp
    with pytest.raises(wmtp.NoCompatibleModelError) as err:
        wmtp.resolve("baseline-mtp", list(bad.values()))
    lines = str(err.value).splitlines()[1:]
    assert lines[0] == (
        f"  {bad['fifo']}: ModelFileError: {bad['fifo']}/metadata.json is not a regular file "
        "(a folder, FIFO or device)"
    )
    assert lines[1].startswith(f"  {bad['loop']}: FetchError: {bad['loop']}/metadata.json: ")
    assert "Too many levels of symbolic links" in lines[1]
    assert lines[2].startswith(f"  {bad['dir']}: ModelFileError: {bad['dir']}/metadata.json is")
    assert lines[3].startswith("  foo://x/m: FetchError: foo://x/m: ")


# Class 9: file system and command-line errors.


def test_an_unreadable_config_is_a_fetch_error_naming_it(
    models: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy(models["gpt2_reference"])
    read = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path.name == "config.json":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(wmtp.FetchError, match=rf"{folder}/config.json: .*Input/output error"):
        wmtp.load(str(folder))


def test_a_file_listed_twice_is_refused_when_decoded() -> None:
    data = json.loads((builders.EXAMPLES / "tiny-mtp" / "metadata.json").read_text())
    data["loading_strategy"]["required_files"].append("config.json")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.decode_metadata(json.dumps(data).encode(), source="m/metadata.json")
    assert "m/metadata.json" in str(err.value)
    assert "`required_files` lists config.json more than once" in str(err.value)


def test_an_empty_location_is_refused() -> None:
    with pytest.raises(wmtp.ModelFileError, match=r"the model location is empty"):
        wmtp.load("")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["load", "{mtp}", "--device", "bogus"], "device 'bogus' is not usable here"),
        (["load", "{mtp}", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["load", "s3://b/m", "-o", "max_retries=abc"], "max_retries"),
        (["load", "s3://b/m", "-o", "retry_timeout=soon"], "retry_timeout"),
        (["load", "foo://x/m"], "foo://x/m"),
        (["load", "{missing}"], "does not exist"),
        (["resolve", "rho1-wmtp", "{missing}"], "no candidate serves 'rho1-wmtp'"),
    ],
)
def test_bad_command_line_values_exit_1_with_one_clear_line(
    args: list[str],
    words: str,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = {"mtp": str(models["mtp"]), "missing": str(tmp_path / "missing")}
    assert main([a.format(**where) for a in args]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_an_uncreatable_cache_is_named(s3_server: S3Server, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    upload_folder(s3_server, builders.EXAMPLES / "tiny-mtp", "hostile/cache")
    url, options = f"s3://{s3_server.bucket}/hostile/cache", storage_options(s3_server)
    with pytest.raises(wmtp.FetchError, match=rf"the download cache '{blocker}/cache' cannot be"):
        wmtp.load(url, storage_options=options, cache_dir=blocker / "cache", trust_code=True)


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(
    name: str, models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy(models["gpt2_reference"])
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / name)
    if name.endswith(".json"):  # an index in place of the weights
        data = json.loads((folder / "metadata.json").read_text())
        data["loading_strategy"]["required_files"] = ["config.json", name]
        data.pop("files")
        (folder / "metadata.json").write_text(json.dumps(data))
    words = rf"{folder}/{name} is not a regular file"
    with pytest.raises(wmtp.ModelFileError, match=words):
        wmtp.load(str(folder))
    assert any(f"{folder}/{name} is not a regular file" in p for p in check(str(folder)).problems)
    with pytest.raises(wmtp.ModelFileError, match=words):
        inspect_model(str(folder))
    assert main(["inspect", str(folder)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_slow_pattern_is_bounded_over_all_keys(models: dict[str, Path], copy: Copy) -> None:
    """Each key under a per-call limit would still add up; the limit covers the whole mapping."""
    folder = copy(models["gpt2_reference"])
    builders.edit_metadata(folder, state_dict_mapping={"key_transforms": {r"(.*)*Z": "x"}})
    started = time.monotonic()
    try:
        wmtp.load(str(folder))  # fast enough here: then it must load
    except wmtp.MetadataError as e:
        assert "runs away" in str(e)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("option", ["max_retries=-1", "retry_timeout=-1", "retry_timeout=x"])
def test_retry_options_must_be_non_negative_numbers(option: str) -> None:
    key, _, value = option.partition("=")
    with pytest.raises(wmtp.OptionError, match=r"max_retries and retry_timeout"):
        wmtp.load("s3://bucket/model", storage_options={key: value})


def test_an_absurd_config_stops_building_early(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text()) | {"n_layer": 100_000}
    builders.write_text(folder, "config.json", json.dumps(config))
    started = time.monotonic()
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert time.monotonic() - started < 30  # building 10**5 layers would take minutes
    assert f"{folder}/config.json (AutoModelForCausalLM): building the model" in str(err.value)
    assert "far more than the checkpoint has" in str(err.value)


def test_an_unknown_home_is_a_missing_folder() -> None:
    with pytest.raises(wmtp.ModelFileError, match=r"~nobody-wmtp/m' does not exist"):
        wmtp.load("~nobody-wmtp/m")


def test_a_mapping_that_merges_keys_names_its_json_path(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    builders.edit_metadata(folder, state_dict_mapping={"key_transforms": {".*": "same"}})
    with pytest.raises(wmtp.WeightsError, match=r"`\$.loading_strategy.state_dict_mapping` sends"):
        wmtp.load(str(folder))


@pytest.mark.parametrize("form", ["file://./{rel}", "file://{rel}"])
def test_relative_file_urls_mean_the_relative_folder(
    form: str, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old configs' `file://./models/x` and `file://models/x`: never `/models/x`."""
    folder = models["gpt2_reference"]
    monkeypatch.chdir(folder.parent)
    model = wmtp.load(form.format(rel=folder.name))
    files = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in files.items())
    with pytest.raises(wmtp.ModelFileError, match=rf"'{folder.parent}/missing' does not exist"):
        wmtp.load(form.format(rel="missing"))


def test_a_config_with_odd_architectures_still_gets_the_fit_report(
    models: dict[str, Path], copy: Copy
) -> None:
    """Found by the fuzzer: the hint code read `architectures` as a list, whatever it held."""
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text())
    builders.write_text(
        folder, "config.json", json.dumps(config | {"architectures": 5, "n_layer": 1})
    )
    with pytest.raises(wmtp.WeightsError, match=r"the checkpoint does not fit GPT2LMHeadModel"):
        wmtp.load(str(folder))

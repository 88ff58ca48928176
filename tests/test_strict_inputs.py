"""Inputs the redesigned core refuses at the root: safetensors files the format's own reader
refuses, paths that leave the folder, a key stored in two shards, a dtype that is not floating
point, a model that fails to build, and temporary download files of live owners."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

import wmtp
from tests import builders
from tests.conftest import Copy
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
    with pytest.raises(wmtp.OptionError, match=r"unknown dtype .*floating point"):
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

"""Decoding `metadata.json`: real files decode, and every mistake names its JSON path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest

import wmtp
from tests.builders import FIXTURES, REAL
from wmtp.metadata import LoaderType, decode_metadata
from wmtp.save import encode_metadata


def good() -> dict[str, Any]:
    """A valid metadata document to spoil one field at a time."""
    data: dict[str, Any] = json.loads((REAL / "distilgpt2" / "metadata.json").read_text())
    return data


def decode(data: dict[str, Any]) -> wmtp.Metadata:
    return decode_metadata(json.dumps(data).encode(), source="m/metadata.json")


@pytest.mark.parametrize("folder", sorted(p.name for p in REAL.iterdir()))
def test_every_real_file_decodes(folder: str) -> None:
    path = REAL / folder / "metadata.json"
    raw = json.loads(path.read_text())
    meta = decode_metadata(path.read_bytes(), source=str(path))
    assert meta.loading_strategy.loader_type == raw["loading_strategy"]["loader_type"]
    assert list(meta.algorithm_compatibility) == raw["algorithm_compatibility"]
    assert list(meta.loading_strategy.required_files) == raw["loading_strategy"]["required_files"]
    assert meta.source_path == raw["source_path"]


def test_encode_decode_round_trip() -> None:
    meta = decode(good())
    assert decode_metadata(encode_metadata(meta), source="x") == meta


def test_metadata_is_frozen() -> None:
    meta = decode(good())
    with pytest.raises(AttributeError):
        meta.wmtp_type = "base_model"  # type: ignore[misc]


@pytest.mark.parametrize("folder", ["distilgpt2", "tiny-reward-model"])
def test_missing_loading_strategy_explains_how_to_write_one(folder: str) -> None:
    path = FIXTURES / "wmtp-no-strategy" / folder / "metadata.json"
    with pytest.raises(wmtp.MetadataError) as err:
        decode_metadata(path.read_bytes(), source=str(path))
    message = str(err.value)
    assert str(path) in message
    assert "no `loading_strategy`" in message
    assert '"loader_type": "huggingface"' in message  # an example to copy
    assert "never guesses" in message


DELETE = object()
LS = "loading_strategy"
MAPPING = (LS, "state_dict_mapping")
SPOILS: list[tuple[tuple[str, ...], object, str, str]] = [
    ((LS, "loader_type"), 3, "$.loading_strategy.loader_type", "Expected `str`"),
    ((LS, "loader_type"), "hf", "$.loading_strategy.loader_type", "'custom_mtp', 'huggingface'"),
    (("wmtp_type",), "critic", "$.wmtp_type", "'reward_model'"),
    ((LS, "requried_files"), [], "$.loading_strategy", "unknown field `requried_files`"),
    ((*MAPPING, "remove_prefx"), "a.", "$.loading_strategy.state_dict_mapping", "remove_prefx"),
    ((LS, "required_files"), DELETE, "$.loading_strategy", "`required_files`"),
    (("algorithm_compatibility",), DELETE, "$", "`algorithm_compatibility`"),
    (("algorithm_compatibility",), "rho1-wmtp", "$.algorithm_compatibility", "Expected `array`"),
    ((LS, "required_files"), ["../x"], "$.loading_strategy.required_files[0]", "without '..'"),
    ((LS, "required_files"), ["a", "/etc/x"], "required_files[1]", "leading '/'"),
    ((LS, "transformers_class"), None, "$.loading_strategy.transformers_class", "AutoModelFor"),
    (
        (*MAPPING, "key_transforms"),
        {"(": "x"},
        "key_transforms",
        "missing ), unterminated subpattern",
    ),
]


@pytest.mark.parametrize(("where", "value", "path", "words"), SPOILS)
def test_each_mistake_names_file_path_and_fix(
    where: tuple[str, ...], value: object, path: str, words: str
) -> None:
    data = good()
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    with pytest.raises(wmtp.MetadataError) as err:
        decode(data)
    message = str(err.value)
    assert message.startswith("m/metadata.json: "), message
    assert path in message, message
    assert words in message, message


def test_custom_loader_needs_class_and_module() -> None:
    data = good()
    data["loading_strategy"].update(loader_type="custom_mtp", transformers_class=None)
    with pytest.raises(wmtp.MetadataError, match=r"model_class_name`; custom_mtp needs it"):
        decode(data)
    data["loading_strategy"].update(model_class_name="M", custom_module_file="modeling.py")
    with pytest.raises(wmtp.MetadataError, match=r"must list modeling.py"):
        decode(data)


def test_malformed_json_names_the_file() -> None:
    with pytest.raises(wmtp.MetadataError, match=r"^m/metadata.json: not valid JSON"):
        decode_metadata(b'{"wmtp_type": ', source="m/metadata.json")


def test_errors_are_also_builtins() -> None:
    assert issubclass(wmtp.MetadataError, ValueError)
    assert issubclass(wmtp.ModelFileError, FileNotFoundError)
    assert issubclass(wmtp.WeightsError, KeyError)
    assert issubclass(wmtp.NoCompatibleModelError, LookupError)
    assert str(wmtp.WeightsError("plain words")) == "plain words"


def test_loader_table_covers_every_loader_type() -> None:
    assert set(get_args(LoaderType)) == set(wmtp.LOADERS)


def test_missing_metadata_file_explains(tmp_path: Path) -> None:
    with pytest.raises(wmtp.ModelFileError) as err:
        wmtp.read_metadata(str(tmp_path))
    message = str(err.value)
    assert message.startswith(
        f"{tmp_path}/metadata.json does not exist: every model folder needs a metadata.json; "
        f"`wmtp migrate --write {tmp_path} --role ROLE` writes one from the folder's config.json "
        "and checkpoint (ROLE: base_model, reference_model or reward_model); it says how to load "
        "the model, e.g.\n{"
    )
    assert '"loading_strategy"' in message


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(wmtp.ModelFileError, match=r"model folder .*nowhere.* does not exist"):
        wmtp.read_metadata(str(tmp_path / "nowhere"))

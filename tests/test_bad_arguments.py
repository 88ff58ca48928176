"""Hostile or mistaken input to the loading core: each a clear WmtpError naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import wmtp
from tests import builders
from tests.conftest import Copy
from wmtp.check import check


def _edit(folder: Path, **strategy: Any) -> Path:
    """`builders.edit_metadata`, the manifest dropped: the read itself must fail, not a check."""
    meta = json.loads((builders.edit_metadata(folder, **strategy) / "metadata.json").read_text())
    meta.pop("files", None)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_a_required_file_name_too_long_is_a_fetch_error_naming_it(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    name = "x" * 300 + ".json"
    required = [*wmtp.read_metadata(folder).loading_strategy.required_files, name]
    _edit(folder, required_files=required)
    with pytest.raises(wmtp.FetchError, match=f"{folder}/{name}: .*File name too long"):
        wmtp.load(folder)
    assert any("File name too long" in p for p in check(folder).problems)


def test_a_checkpoint_that_cannot_be_read_is_a_fetch_error_naming_it(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/proc/self/mem")  # every read: EIO
    _edit(folder)
    with pytest.raises(wmtp.FetchError, match=rf"{folder}/model.safetensors: .*Input/output"):
        wmtp.load(folder)
    assert any("Input/output error" in p for p in check(folder).problems)


def test_a_replacement_naming_an_unknown_group_is_a_metadata_error(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = _edit(copy(models["mtp"]), state_dict_mapping={"key_transforms": {"(a)": r"\g<x>"}})
    with pytest.raises(wmtp.MetadataError, match=r"unknown group name 'x' - at `\$.loading"):
        wmtp.load(folder)
    with pytest.raises(wmtp.NoCompatibleModelError, match=r"MetadataError: .*unknown group"):
        wmtp.resolve("baseline-mtp", [folder])


def test_a_module_that_exits_has_failed_to_import(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    (folder / "modeling.py").write_text("import sys\nsys.exit(0)\n")
    _edit(folder)
    with pytest.raises(wmtp.MetadataError, match=r"modeling.py: importing .* failed: SystemExit"):
        wmtp.load(folder)
    assert any("SystemExit(0)" in p for p in check(folder).problems)


@pytest.mark.parametrize("overrides", [[("n_layer", 2)], "n_layer=2", 5])
def test_config_overrides_must_be_a_dict(models: dict[str, Path], overrides: Any) -> None:
    with pytest.raises(wmtp.OptionError, match="config_overrides takes a dict of settings"):
        wmtp.load(models["mtp"], config_overrides=overrides)


def test_one_path_instead_of_a_list_is_refused(models: dict[str, Path]) -> None:
    for one in (str(models["mtp"]), models["mtp"]):
        with pytest.raises(wmtp.OptionError, match="paths takes a list of folders or URLs"):
            wmtp.resolve("baseline-mtp", one)  # type: ignore[arg-type]
        with pytest.raises(wmtp.OptionError, match="paths takes a list of folders or URLs"):
            wmtp.load_roles("baseline-mtp", one)  # type: ignore[arg-type]


def test_load_roles_arguments(models: dict[str, Path]) -> None:
    paths = [models["mtp"]]
    with pytest.raises(wmtp.OptionError, match=r"roles takes a non-empty list .*\[\]"):
        wmtp.load_roles("baseline-mtp", paths, roles=[])
    with pytest.raises(wmtp.OptionError, match="algo takes the name of a training algorithm"):
        wmtp.load_roles(None, paths)  # type: ignore[arg-type]
    with pytest.raises(wmtp.NoCompatibleModelError, match="no candidate serves None"):
        wmtp.resolve(None, paths)  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_folder_without_read_permission_names_it(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    folder.chmod(0)
    try:
        with pytest.raises(wmtp.WmtpError, match=str(folder)):
            wmtp.load(folder)
    finally:
        folder.chmod(0o755)

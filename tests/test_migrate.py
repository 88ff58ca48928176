"""`migrate`: v2 metadata from explicit evidence, written only when asked, `check` passing after."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import obstore
import pytest
from safetensors.torch import load_file

import wmtp
from tests import builders
from tests.builders import FIXTURES
from tests.conftest import Copy
from tests.s3server import S3Server, make_store, storage_options, upload_folder
from tests.test_load import assert_equals_file, file_tensors
from wmtp.check import check
from wmtp.cli import main
from wmtp.migrate import migrate, migration_diff, write_migration

NO_STRATEGY = FIXTURES / "wmtp-no-strategy"


def old_folder(models: dict[str, Path], copy: Copy, model: str, fixture: str) -> Path:
    folder = copy(models[model])
    shutil.copy(NO_STRATEGY / fixture / "metadata.json", folder / "metadata.json")
    return folder


def test_migrates_old_reference_model(models: dict[str, Path], copy: Copy) -> None:
    folder = old_folder(models, copy, "gpt2_reference", "distilgpt2")
    old = (folder / "metadata.json").read_text()
    migration = migrate(str(folder), algorithms=["rho1-wmtp"])
    assert (folder / "metadata.json").read_text() == old  # nothing written without asking
    new = json.loads(migration.new)
    assert new["loading_strategy"]["loader_type"] == "huggingface"
    assert new["loading_strategy"]["transformers_class"] == "AutoModelForCausalLM"
    assert new["wmtp_type"] == "reference_model"  # carried over
    assert new["source_path"] == "tests/tiny_models/distilgpt2"
    assert new["algorithm_compatibility"] == ["rho1-wmtp"]
    sizes = {name: entry["size"] for name, entry in new["files"].items()}
    assert sizes == {n: (folder / n).stat().st_size for n in ["config.json", "model.safetensors"]}
    diff = migration_diff(migration)
    assert diff.startswith("--- metadata.json\n+++ metadata.json (proposed)\n")
    assert '+  "loading_strategy": {' in diff
    backup = write_migration(migration)
    assert Path(backup).read_text() == old
    assert check(str(folder)).problems == ()
    assert_equals_file(wmtp.load(str(folder)), file_tensors(folder))


def test_migrates_old_reward_classifier_to_the_right_auto_class(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = old_folder(models, copy, "distilbert_reward", "tiny-reward-model")
    migration = migrate(str(folder), algorithms=["critic-wmtp"])
    strategy = json.loads(migration.new)["loading_strategy"]
    assert strategy["transformers_class"] == "AutoModelForSequenceClassification"
    write_migration(migration)
    assert wmtp.resolve("critic-wmtp", [str(folder)], role="reward_model") == str(folder)
    assert type(wmtp.load(str(folder))).__name__ == "DistilBertForSequenceClassification"


def test_plain_custom_folder_gets_class_and_key_mapping(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    (folder / "metadata.json").unlink()
    original = file_tensors(folder)
    builders.write_checkpoint(folder, {"module." + k: v for k, v in original.items()})
    with pytest.raises(wmtp.MetadataError, match=r"nothing says this model's role; pass wmtp_type"):
        migrate(str(folder))
    migration = migrate(str(folder), wmtp_type="base_model")
    assert migration.old is None
    strategy = json.loads(migration.new)["loading_strategy"]
    assert strategy["loader_type"] == "custom_mtp"
    assert strategy["model_class_name"] == "DistilGPT2MTP"  # config.json architectures
    assert strategy["custom_module_file"] == "modeling.py"  # the file that defines it
    assert strategy["state_dict_mapping"]["remove_prefix"] == "module."
    assert any("algorithm_compatibility is empty" in n for n in migration.notes)
    assert write_migration(migration) == ""
    assert check(str(folder)).problems == ()
    assert_equals_file(wmtp.load(str(folder)), original)


def test_no_evidence_no_guess(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    (folder / "metadata.json").unlink()
    (folder / "modeling.py").rename(folder / "other.py")
    (folder / "other.py").write_text("class SomethingElse:\n    pass\n")
    with pytest.raises(wmtp.MetadataError, match=r"names DistilGPT2MTP, which no .py file"):
        migrate(str(folder), wmtp_type="base_model")


def test_several_checkpoints_without_index_are_refused(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    shutil.copy(folder / "model.safetensors", folder / "other.safetensors")
    with pytest.raises(wmtp.ModelFileError, match=r"2 safetensors files and no index"):
        migrate(str(folder))


def test_keys_that_fit_no_mapping_are_reported(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.ln_f.weight"]
    builders.write_checkpoint(folder, tensors)
    with pytest.raises(wmtp.MetadataError, match=r"no key mapping makes the checkpoint fit"):
        migrate(str(folder))


def test_cli_migrate_prints_diff_and_writes_only_with_write(
    models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = old_folder(models, copy, "gpt2_reference", "distilgpt2")
    old = (folder / "metadata.json").read_text()
    assert main(["migrate", str(folder), "--algorithm", "rho1-wmtp"]) == 0
    out = capsys.readouterr().out
    assert '+    "transformers_class": "AutoModelForCausalLM",' in out
    assert "not written: run again with --write" in out
    assert (folder / "metadata.json").read_text() == old
    assert main(["migrate", str(folder), "--algorithm", "rho1-wmtp", "--write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["backup"]).read_text() == old
    assert main(["check", str(folder)]) == 0


def test_plain_folder_is_migrated_by_the_command_its_error_names(
    models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy(models["gpt2_reference"])
    (folder / "metadata.json").unlink()
    with pytest.raises(wmtp.ModelFileError) as err:
        wmtp.load(str(folder))
    command = re.search(r"`wmtp (migrate --write .*) ROLE`", str(err.value))
    assert command is not None
    args = [*shlex.split(command[1]), "reference_model", "--algorithm", "rho1-wmtp"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- /dev/null\n+++ metadata.json (proposed)\n")
    assert out.endswith("\n+}\nwritten (no old file)\n")  # not "old file kept at None"
    assert sorted(p.name for p in folder.iterdir() if "metadata" in p.name) == ["metadata.json"]
    assert_equals_file(wmtp.load(str(folder)), file_tensors(folder))


def test_migrate_on_s3_writes_back(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    folder = shutil.copytree(models["gpt2_reward"], tmp_path / "src")
    shutil.copy(NO_STRATEGY / "tiny-reward-model" / "metadata.json", folder / "metadata.json")
    upload_folder(s3_server, folder, "migrate/rm")
    url, options = f"s3://{s3_server.bucket}/migrate/rm", storage_options(s3_server)
    migration = migrate(url, algorithms=["critic-wmtp"], storage_options=options)
    backup = write_migration(migration, storage_options=options)
    store = make_store(s3_server, "migrate/rm")
    assert bytes(obstore.get(store, "metadata.json").bytes()).decode() == migration.new
    assert backup.startswith(f"{url}/metadata.json.") and backup.endswith(".bak")
    old = (NO_STRATEGY / "tiny-reward-model" / "metadata.json").read_bytes()
    assert bytes(obstore.get(store, backup.rsplit("/", 1)[1]).bytes()) == old
    assert check(url, storage_options=options).problems == ()
    model = wmtp.load(url, storage_options=options, cache_dir=tmp_path / "cache")
    assert_equals_file(model, file_tensors(folder))


def test_migrate_refuses_when_the_file_changed_meanwhile(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = old_folder(models, copy, "gpt2_reference", "distilgpt2")
    migration = migrate(str(folder), algorithms=["rho1-wmtp"])
    (folder / "metadata.json").write_text((folder / "metadata.json").read_text() + " ")
    with pytest.raises(wmtp.MetadataError, match=r"changed since it was read; migrate again"):
        write_migration(migration)

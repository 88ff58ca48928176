"""`load_tokenizer`, and the tokenizer in `save`, `migrate` and `check`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import wmtp
from tests import builders
from tests.builders import FIXTURES, TOKENIZER_TEXT
from tests.conftest import Copy
from tests.s3server import S3Server, get_bytes_served, storage_options, upload_folder
from tests.test_check import header_end
from wmtp.check import check
from wmtp.migrate import migrate, write_migration

TEXTS = [*TOKENIZER_TEXT, "Some TEXT never seen: zebra 42!", ""]
SAVED = ["tokenizer.json", "tokenizer_config.json"]  # what tiny_tokenizer's save_pretrained writes


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The custom MTP model saved with the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("tok") / "mtp"
    wmtp.save(
        builders.mtp_model(),
        folder,
        wmtp_type="base_model",
        algorithm_compatibility=["baseline-mtp"],
        tokenizer=builders.tiny_tokenizer(),
    )
    return folder


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that receives every temporary file and folder of the test."""
    (tmp := tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def assert_same(tok: Any, expected: Any) -> None:
    assert tok.get_vocab() == expected.get_vocab()
    assert len(tok.get_vocab()) > 20
    for text in TEXTS:
        assert tok(text).input_ids == expected(text).input_ids
    assert tok(TEXTS[0]).input_ids[0] == 1 and tok(TEXTS[0]).input_ids[-1] == 2
    batch = tok(TEXTS[:2], padding=True).input_ids
    assert batch == expected(TEXTS[:2], padding=True).input_ids
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.decode(tok(TEXTS[0]).input_ids, skip_special_tokens=True) == TEXTS[0]


def test_round_trip(with_tokenizer: Path, private_tmp: Path) -> None:
    tok = wmtp.load_tokenizer(str(with_tokenizer))
    assert_same(tok, builders.tiny_tokenizer())
    assert tok.padding_side == "right"
    assert tok.name_or_path == str(with_tokenizer)
    assert list(private_tmp.iterdir()) == []  # the folder of links is gone


def test_save_lists_files_with_hashes(with_tokenizer: Path) -> None:
    meta = wmtp.read_metadata(str(with_tokenizer))
    assert list(meta.loading_strategy.tokenizer_files) == SAVED
    assert meta.loading_strategy.required_files == (
        "config.json",
        "model.safetensors",
        "modeling.py",
    )
    assert meta.files is not None
    for name in SAVED:
        data = (with_tokenizer / name).read_bytes()
        assert meta.files[name].sha256 == hashlib.sha256(data).hexdigest()
        assert meta.files[name].size == len(data)
    assert sorted(p.name for p in with_tokenizer.iterdir()) == sorted(
        ["config.json", "metadata.json", "model.safetensors", "modeling.py", *SAVED]
    )  # no temporary folder left behind
    assert check(str(with_tokenizer)).problems == ()
    assert type(wmtp.load(str(with_tokenizer))).__name__ == "DistilGPT2MTP"


def test_save_without_tokenizer_writes_none(models: dict[str, Path]) -> None:
    meta = wmtp.read_metadata(str(models["mtp"]))
    assert meta.loading_strategy.tokenizer_files == ()
    assert meta.files is not None and not set(meta.files) & set(SAVED)
    assert not any((models["mtp"] / name).exists() for name in SAVED)


def test_save_refuses_what_is_no_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(wmtp.OptionError, match="tokenizer= takes a transformers tokenizer"):
        wmtp.save(
            builders.mtp_model(),
            tmp_path / "out",
            wmtp_type="base_model",
            algorithm_compatibility=[],
            tokenizer="gpt2",
        )
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_hf_model_with_tokenizer(tmp_path: Path) -> None:
    model = builders.hf_model(
        "AutoModelForCausalLM", builders.fixture_config("distilgpt2", **builders.GPT2_SHRINK_ALL)
    )
    meta = wmtp.save(
        model,
        tmp_path,
        wmtp_type="reference_model",
        algorithm_compatibility=[],
        tokenizer=builders.tiny_tokenizer(),
    )
    assert meta.loading_strategy.loader_type == "huggingface"
    assert list(meta.loading_strategy.tokenizer_files) == SAVED
    assert_same(wmtp.load_tokenizer(str(tmp_path)), builders.tiny_tokenizer())


def test_no_tokenizer_files_says_what_to_add(models: dict[str, Path]) -> None:
    with pytest.raises(wmtp.MetadataError) as info:
        wmtp.load_tokenizer(str(models["gpt2_reference"]))
    message = str(info.value)
    assert message.startswith(f"{models['gpt2_reference']}/metadata.json: ")
    assert "`$.loading_strategy.tokenizer_files`" in message
    assert '["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]' in message
    assert "wmtp.save(..., tokenizer=tok)" in message
    assert check(str(models["gpt2_reference"])).problems == ()  # nothing listed: nothing checked


@pytest.mark.parametrize("append", [False, True])
def test_tampered_file_is_refused(with_tokenizer: Path, copy: Copy, append: bool) -> None:
    folder = copy(with_tokenizer)
    path = folder / "tokenizer.json"
    data = path.read_bytes()
    path.write_bytes(data + b" " if append else data.replace(b"<unk>", b"<UNK>"))
    what = "bytes" if append else "sha256"
    with pytest.raises(wmtp.IntegrityError, match=rf"tokenizer\.json has .*{what}"):
        wmtp.load_tokenizer(str(folder))
    problems = check(str(folder)).problems
    assert len(problems) == 1 and f"{folder}/tokenizer.json has" in problems[0]


def test_missing_files_each_reported(with_tokenizer: Path, copy: Copy) -> None:
    folder = copy(with_tokenizer)
    for name in SAVED:
        (folder / name).unlink()
    with pytest.raises(wmtp.ModelFileError, match="tokenizer file"):
        wmtp.load_tokenizer(str(folder))
    problems = check(str(folder)).problems
    assert problems == tuple(
        f"tokenizer file {folder}/{name} does not exist; add it, or remove it from "
        "loading_strategy.tokenizer_files"
        for name in SAVED
    )
    assert wmtp.load(str(folder)) is not None  # the model itself is not concerned


def test_unreadable_tokenizer(with_tokenizer: Path, copy: Copy, private_tmp: Path) -> None:
    folder = copy(with_tokenizer)
    builders.write_text(folder, "tokenizer.json", '{"version": "1.0", "model": 7}')
    with pytest.raises(wmtp.MetadataError, match="refuses the tokenizer") as info:
        wmtp.load_tokenizer(str(folder))
    assert "tokenizer.json, tokenizer_config.json" in str(info.value)
    assert info.value.__cause__ is not None
    assert list(private_tmp.iterdir()) == []
    (problem,) = check(str(folder)).problems
    assert problem == str(info.value)


def test_folder_code_never_runs(with_tokenizer: Path, copy: Copy, tmp_path: Path) -> None:
    folder = copy(with_tokenizer)
    marker = tmp_path / "ran"
    builders.write_text(folder, "tok_code.py", f"open({str(marker)!r}, 'w')\nclass EvilTok: ...\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {
        "tokenizer_class": "EvilTok",
        "auto_map": {"AutoTokenizer": ["tok_code.EvilTok", None]},
    }
    builders.write_text(folder, "tokenizer_config.json", json.dumps(config))
    builders.edit_metadata(folder, tokenizer_files=[*SAVED, "tok_code.py"])
    with pytest.raises(wmtp.MetadataError, match="refuses the tokenizer"):
        wmtp.load_tokenizer(str(folder))
    assert not marker.exists()


def test_files_in_a_subfolder(with_tokenizer: Path, copy: Copy) -> None:
    folder = copy(with_tokenizer)
    (folder / "tokenizer").mkdir()
    for name in SAVED:
        (folder / name).rename(folder / "tokenizer" / name)
        builders.refresh_manifest(folder, f"tokenizer/{name}")
    builders.edit_metadata(folder, tokenizer_files=[f"tokenizer/{n}" for n in SAVED])
    assert_same(wmtp.load_tokenizer(str(folder)), builders.tiny_tokenizer())
    assert check(str(folder)).problems == ()


@pytest.mark.parametrize("old", [True, False])
def test_migrate_lists_tokenizer_files(models: dict[str, Path], copy: Copy, old: bool) -> None:
    folder = copy(models["gpt2_reference"])
    if old:
        shutil.copy(FIXTURES / "wmtp-no-strategy" / "distilgpt2" / "metadata.json", folder)
    else:
        (folder / "metadata.json").unlink()
    builders.tiny_tokenizer().save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}')
    (folder / "notes.txt").write_text("not a tokenizer file")
    listed = sorted([*SAVED, "special_tokens_map.json"])
    migration = migrate(str(folder), wmtp_type="reference_model")
    new = json.loads(migration.new)
    assert new["loading_strategy"]["tokenizer_files"] == listed
    assert set(new["files"]) == {"config.json", "model.safetensors", *listed}
    for name in listed:
        sha = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert new["files"][name]["sha256"] == sha
    write_migration(migration)
    assert check(str(folder)).problems == ()
    assert wmtp.load_tokenizer(str(folder)).pad_token == "<pad>"


def test_migrate_without_tokenizer_lists_none(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    (folder / "metadata.json").unlink()
    new = json.loads(migrate(str(folder), wmtp_type="reference_model").new)
    assert new["loading_strategy"]["tokenizer_files"] == []
    assert set(new["files"]) == {"config.json", "model.safetensors"}


def test_from_s3(with_tokenizer: Path, s3_server: S3Server, tmp_path: Path) -> None:
    upload_folder(s3_server, with_tokenizer, "tokenizer/mtp")
    url, opts = f"s3://{s3_server.bucket}/tokenizer/mtp", storage_options(s3_server)
    cache = tmp_path / "cache"
    tok = wmtp.load_tokenizer(url, storage_options=opts, cache_dir=cache)
    assert_same(tok, builders.tiny_tokenizer())
    assert sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name in SAVED) == SAVED
    weights = "tokenizer/mtp/model.safetensors"
    sent = get_bytes_served(s3_server, weights)
    report = check(url, storage_options=opts, cache_dir=str(cache), trust_code=True)
    assert report.problems == () and report.model_class == "DistilGPT2MTP"
    # The tokenizer is checked, but of the weights only the header is read, as without one.
    assert get_bytes_served(s3_server, weights) - sent == header_end(
        with_tokenizer / "model.safetensors"
    )
    assert not list(cache.rglob("model.safetensors*"))


def test_from_s3_missing_and_tampered(
    with_tokenizer: Path, copy: Copy, s3_server: S3Server, tmp_path: Path
) -> None:
    folder = copy(with_tokenizer)
    path = folder / "tokenizer.json"
    path.write_bytes(path.read_bytes().replace(b"<unk>", b"<UNK>"))
    (folder / "tokenizer_config.json").unlink()
    upload_folder(s3_server, folder, "tokenizer/broken")
    url, opts = f"s3://{s3_server.bucket}/tokenizer/broken", storage_options(s3_server)
    with pytest.raises(wmtp.ModelFileError, match=r"tokenizer_config\.json"):
        wmtp.load_tokenizer(url, storage_options=opts, cache_dir=tmp_path / "cache")
    builders.edit_metadata(folder, tokenizer_files=["tokenizer.json"])
    upload_folder(s3_server, folder, "tokenizer/broken")
    with pytest.raises(wmtp.IntegrityError, match="sha256"):
        wmtp.load_tokenizer(url, storage_options=opts, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("tokenizer.json"))  # nothing cached


# A user's first session with the example: its tokenizer feeding its model, in a fresh interpreter.
EXAMPLE_SESSION = """
import json, torch, wmtp
tok = wmtp.load_tokenizer("examples/tiny-mtp")
model = wmtp.load("examples/tiny-mtp")
texts = ["The quick brown fox predicts the next four tokens", "Zebra 42! <|endoftext|>"]
batch = tok(texts, padding=True, return_tensors="pt")
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
with torch.no_grad():
    out = model(**batch, labels=labels)
print(json.dumps({
    "ids": batch["input_ids"].tolist(),
    "mask": batch["attention_mask"].tolist(),
    "special": [tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id],
    "config": [model.config.vocab_size, model.config.bos_token_id, model.config.eos_token_id],
    "decoded": tok.decode(batch["input_ids"][0], skip_special_tokens=True),
    "logits": list(out["logits"].shape),
    "finite": bool(out["logits"].isfinite().all()),
    "loss": out["loss"].item(),
}))
"""


def test_example_tokenizer_feeds_the_example_model() -> None:
    root = builders.EXAMPLES.parent
    done = subprocess.run(
        [sys.executable, "-c", EXAMPLE_SESSION], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    vocab = got["config"][0]
    assert vocab == 256
    ids = [i for row in got["ids"] for i in row]
    assert all(0 <= i < vocab for i in ids)
    assert got["special"] == [0, 1, 255, 255]  # <unk>, <pad>, <|endoftext|> twice
    assert got["config"][1:] == [255, 255]  # the model's bos and eos are the tokenizer's
    assert max(ids) == 255 and 0 in got["ids"][1]  # the top id used; unseen "4", "2", "!" unk
    first, second = got["ids"]
    assert len(first) > len([i for i in second if i != 1])  # so the second row is padded
    assert second[-1] == 1 and got["mask"][1][-1] == 0
    assert 0 not in first and got["decoded"] == "the quick brown fox predicts the next four tokens"
    assert got["logits"] == [2, len(first), 4, vocab]
    assert got["finite"] and 0 < got["loss"] < 20

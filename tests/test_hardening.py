"""Hardening, round 2: the download cache never carries one server's files to another, `save`
checks its arguments and destination before writing and leaves no new weights under old
metadata, and bad `storage_options` are option errors naming the key."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest

import wmtp
from tests import builders
from tests.s3mirror import Mirror, start_mirror
from tests.s3server import S3Server, make_store, storage_options, upload_folder
from tests.test_load import assert_equals_file, file_tensors
from wmtp import remote
from wmtp.cli import main

# Every way to name an S3 endpoint: an option under each of obstore's aliases, or a variable.
ENDPOINTS = ["endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url", "AWS_ENDPOINT_URL",
             "env AWS_ENDPOINT_URL", "env AWS_ENDPOINT"]  # fmt: skip
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_BUCKET")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No endpoint, region or bucket from the environment unless a test sets one."""
    for name in S3_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def aimed(alias: str, endpoint: str, options: dict[str, Any], env: pytest.MonkeyPatch) -> Any:
    """`options` aimed at `endpoint` through `alias`: an option, or an environment variable."""
    if alias.startswith("env "):
        env.setenv(alias.removeprefix("env "), endpoint)
        return options
    return options | {alias: endpoint}


def folder(location: str, options: dict[str, Any]) -> str:
    """The cache folder (without its version) of `location` under `options`."""
    return remote._folder(location, options, {"e_tag": '"x"'}).partition("/")[0]


# 1. The cache key is the store as obstore configures it.


@pytest.mark.parametrize(("mirror", "real"), itertools.product(ENDPOINTS, ENDPOINTS))
def test_no_two_endpoints_share_a_cache_folder(
    mirror: str, real: str, clean_env: pytest.MonkeyPatch
) -> None:
    base = {"region": "us-east-1"}
    bad = folder("s3://b/m", aimed(mirror, "http://127.0.0.1:1", base, clean_env))
    clean_env.delenv("AWS_ENDPOINT_URL", raising=False)
    clean_env.delenv("AWS_ENDPOINT", raising=False)
    good = folder("s3://b/m", aimed(real, "http://127.0.0.1:2", base, clean_env))
    assert bad != good
    # One server is one folder, whichever alias names it.
    assert good == folder("s3://b/m", base | {"endpoint": "http://127.0.0.1:2"})


@pytest.mark.parametrize(
    ("location", "one", "other"),
    [
        ("s3://b/m", {"region": "us-east-1"}, {"region": "eu-west-1"}),  # another AWS host
        ("s3://b/m", {}, {"bucket": "other"}),  # the option beats the URL's bucket
        ("s3://b/m", {}, {"virtual_hosted_style_request": "true"}),
        ("s3://b/m", {}, {"proxy_url": "http://127.0.0.1:3"}),
        ("s3://b/m", {}, {"allow_invalid_certificates": "true"}),
        ("s3://b/m", {}, {"AWS_ALLOW_HTTP": "true"}),  # a client option under an alias
        ("gs://b/m", {}, {"google_base_url": "http://127.0.0.1:1"}),
        ("gs://b/m", {"base_url": "http://127.0.0.1:1"}, {"base_url": "http://127.0.0.1:2"}),
        ("az://c/m", {"account_name": "a"}, {"account_name": "b"}),
        ("az://c/m", {"account_name": "a"}, {"account_name": "a", "endpoint": "http://h:1"}),
        ("az://c/m", {"account_name": "a"}, {"azure_storage_account_name": "b"}),
        ("s3://b/m", {}, {"s3://b/": {"endpoint": "http://127.0.0.1:1"}}),
    ],
)
def test_every_setting_of_the_server_makes_its_own_folder(
    location: str, one: dict[str, Any], other: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    assert folder(location, one) != folder(location, other)


def test_environment_settings_count_unless_an_option_overrides_them(
    clean_env: pytest.MonkeyPatch,
) -> None:
    options = {"endpoint": "http://127.0.0.1:1"}
    plain = folder("s3://b/m", {})
    clean_env.setenv("AWS_REGION", "eu-west-1")
    assert folder("s3://b/m", {}) != plain
    assert folder("s3://b/m", {"region": "eu-west-1"}) == folder("s3://b/m", {})
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    with_env = folder("s3://b/m", options)
    clean_env.delenv("AWS_ENDPOINT_URL")
    assert with_env == folder("s3://b/m", options)  # the option wins: the variable is moot
    clean_env.setenv("AWS_BUCKET", "other")  # the URL's bucket wins over the variable
    assert folder("s3://b/m", options) == with_env
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acc")
    first = folder("az://c/m", {})
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "other")
    assert folder("az://c/m", {}) != first
    clean_env.setenv("HTTPS_PROXY", "http://127.0.0.1:4")  # the HTTP client's own variables
    assert folder("az://c/m", {}) != first


def test_secrets_and_timeouts_do_not_change_the_folder(clean_env: pytest.MonkeyPatch) -> None:
    keys = {"access_key_id": "a", "secret_access_key": "b", "session_token": "c"}
    other = {"access_key_id": "x", "secret_access_key": "y", "timeout": "5s", "max_retries": "1"}
    name = folder("s3://b/m", keys)
    assert name == folder("s3://b/m", other) == folder("s3://b/m", {})


@pytest.fixture(scope="module")
def real(models: dict[str, Path], s3_server: S3Server) -> str:
    """The mtp model on the S3 test server."""
    upload_folder(s3_server, models["mtp"], "hardening/mtp")
    return f"s3://{s3_server.bucket}/hardening/mtp"


@pytest.fixture(scope="module")
def mirror(
    real: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mirror, Path]]:
    """A mirror serving another model of the same sizes (its own weights, and the same
    modeling.py), each file under the ETag the real server gives it."""
    other = builders.save_mtp(tmp_path_factory.mktemp("mirror") / "mtp", seed=1)
    store = make_store(s3_server, "hardening/mtp")
    objects = {}
    for path in other.iterdir():
        etag = obstore.head(store, path.name)["e_tag"] or ""
        objects[f"{s3_server.bucket}/hardening/mtp/{path.name}"] = (path.read_bytes(), etag)
    server = start_mirror(objects)
    yield server, other
    server.shutdown()


@pytest.mark.parametrize("alias", ENDPOINTS)
def test_a_mirror_never_poisons_the_real_servers_cache(
    alias: str,
    real: str,
    mirror: tuple[Mirror, Path],
    s3_server: S3Server,
    models: dict[str, Path],
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
) -> None:
    server, served = mirror
    base = {k: v for k, v in storage_options(s3_server).items() if k != "endpoint"}
    cache = tmp_path / "cache"
    options = aimed(alias, server.endpoint, base, clean_env)
    from_mirror = wmtp.load(real, storage_options=options, cache_dir=cache, trust_code=True)
    assert_equals_file(from_mirror, file_tensors(served))  # what the mirror serves
    options = aimed(alias, s3_server.endpoint, base, clean_env)
    model = wmtp.load(real, storage_options=options, cache_dir=cache, trust_code=True)
    assert_equals_file(model, file_tensors(models["mtp"]))  # the real server's weights
    assert len({p.parent.parent for p in cache.rglob("model.safetensors")}) == 2
    assert len({p.parent.parent for p in cache.rglob("modeling.py")}) == 2


# 3. storage_options and the AWS files.


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ("region=us-east-1", "not str ('region=us-east-1')"),
        (["region"], "not list"),
        ({"region": 5}, "storage option 'region' is 5 (int)"),
        ({"region": None}, "storage option 'region' is None"),
        ({"endpoint": b"http://h"}, "storage option 'endpoint' is b'http://h' (bytes)"),
        ({"s3://b/": {"region": 5}}, "storage option 'region' is 5"),
        ({5: "x"}, "not an option name: 5"),
        ({"s3://b/": {None: "x"}}, "storage_options['s3://b/'] has a key that is not an option"),
    ],
)
def test_storage_options_of_the_wrong_type_are_option_errors(options: Any, named: str) -> None:
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.load("s3://b/m", storage_options=options)
    assert named in str(err.value)


def test_option_values_obstore_takes_are_taken(clean_env: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    options: Any = {"max_retries": 0, "retry_timeout": 1.5, "skip_signature": True,
               "timeout": timedelta(seconds=5), "default_headers": {"x-a": "b"},
               "aws_allow_http": "true", "AWS_HTTP2_ONLY": "false"}  # fmt: skip
    store: Any = remote.open_remote("s3://b/m", options)
    assert store.client_options is not None
    assert store.client_options["allow_http"] == "true"
    assert store.client_options["http2_only"] == "false"
    assert folder("s3://b/m", options)  # a client option under an alias is no config key


@pytest.mark.parametrize("broken", ["config", "credentials"])
def test_an_aws_file_that_does_not_parse_is_named(
    broken: str, tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {"credentials": tmp_path / "credentials", "config": tmp_path / "config"}
    files["credentials"].write_text("[p]\naws_access_key_id = a\naws_secret_access_key = b\n")
    files["config"].write_text("[profile p]\nregion = us-east-1\n")
    files[broken].write_text("[p\nthis is no INI file\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        clean_env.delenv(name, raising=False)
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files["credentials"]))
    clean_env.setenv("AWS_CONFIG_FILE", str(files["config"]))
    clean_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    remote._boto3_provider.cache_clear()
    options = {"profile": "p", "endpoint": "http://127.0.0.1:9", "max_retries": "0"}
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.load("s3://b/m", storage_options=options)
    assert str(files[broken]) in str(err.value)
    assert "AWS profile 'p'" in str(err.value)
    clean_env.setenv("AWS_PROFILE", "p")
    assert main(["check", "s3://b/m", "-o", "endpoint=http://127.0.0.1:9"]) == 1
    assert str(files[broken]) in capsys.readouterr().out


# 2. save: its arguments and destination are checked before anything is written.

SAVE_ARGS: dict[str, Any] = {"wmtp_type": "base_model", "algorithm_compatibility": ["baseline-mtp"]}


@pytest.fixture(scope="module")
def small() -> Any:
    """A small transformers model to save."""
    return builders.hf_model(
        "AutoModelForCausalLM", builders.fixture_config("distilgpt2", **builders.GPT2_SHRINK_ALL)
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"algorithm_compatibility": "baseline-mtp"}, "algorithm_compatibility='baseline-mtp'"),
        ({"wmtp_type": "bogus_model"}, "'base_model', 'reference_model', 'reward_model'"),
        ({"wmtp_type": None}, "wmtp_type=None"),
        ({"algorithm_compatibility": ["a", 5]}, "$.algorithm_compatibility[1]"),
        ({"training_algorithm": 5}, "training_algorithm=5"),
        ({"base_architecture": ["gpt2"]}, "base_architecture=['gpt2']"),
        ({"transformers_class": ""}, "transformers_class=''"),
    ],
)
def test_save_checks_its_arguments_before_writing(
    args: dict[str, Any], named: str, small: Any, tmp_path: Path
) -> None:
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.save(small, tmp_path / "m", **(SAVE_ARGS | args))
    assert named in str(err.value)
    assert not (tmp_path / "m").exists()
    with pytest.raises(wmtp.OptionError):  # a URL too, before the store is touched
        wmtp.save(small, "s3://b/m", **(SAVE_ARGS | args), storage_options={"bogus": "1"})


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into, root included (chattr +i), holding a saved model."""
    folder = tmp_path / "read-only"
    builders.save_gpt2_reference(folder)
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root writes anywhere here, and chattr +i does not work on this file system")
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_save_destinations_that_cannot_be_written_are_named(
    small: Any, tmp_path: Path, read_only: Path
) -> None:
    (file := tmp_path / "file").write_text("x")
    cases = {
        file: "is a file, not a folder",
        file / "sub": f"lies under a file ({file})",
        Path("/proc/x"): "cannot be written",
        read_only: "cannot be written",
        read_only / "new": "cannot be written",
    }
    before = sorted(p.name for p in read_only.iterdir())
    for dest, words in cases.items():
        with pytest.raises(wmtp.OptionError) as err:
            wmtp.save(small, dest, **SAVE_ARGS)
        assert str(err.value).startswith(f"save destination {dest} {words}"), err.value
    assert file.read_text() == "x"
    assert sorted(p.name for p in read_only.iterdir()) == before
    wmtp.load(str(read_only))  # still whole


def test_save_refuses_an_empty_destination_and_expands_home(
    small: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (here := tmp_path / "here").mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home := tmp_path / "home"))
    with pytest.raises(wmtp.OptionError, match="destination is empty"):
        wmtp.save(small, "", **SAVE_ARGS)
    with pytest.raises(wmtp.ModelFileError, match="location is empty"):
        wmtp.load("")
    wmtp.save(small, "~/x", **SAVE_ARGS)
    assert not list(here.iterdir())  # no ./~/x
    assert (home / "x" / "metadata.json").is_file()
    wmtp.load("~/x")


def test_save_refuses_a_model_on_the_meta_device(tmp_path: Path) -> None:
    import torch

    with torch.device("meta"):
        model = builders.hf_model("AutoModelForCausalLM", builders.GPT2_SHRINK_ALL | {
            "model_type": "gpt2"})  # fmt: skip
    with pytest.raises(wmtp.OptionError, match=r"on the meta device \(first: 'transformer"):
        wmtp.save(model, tmp_path / "m", **SAVE_ARGS)
    assert not (tmp_path / "m").exists()


def test_save_refuses_a_class_defined_in_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    # What `python -c` (or a notebook) leaves: a __main__ module without a file.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    base = type(builders.mtp_model())
    model = type("Interactive", (base,), {"__module__": "__main__"})(builders.mtp_model().config)
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.save(model, tmp_path / "m", **SAVE_ARGS)
    assert "Interactive (module '__main__') is defined in no .py file" in str(err.value)
    assert not (tmp_path / "m").exists()


# Stops `save` at `sys.argv[2]` (a name in wmtp.save) and says so; the parent kills it there.
STALL = """
import importlib, sys, time
from tests import builders
module = importlib.import_module("wmtp.save")
def stall(*args, **kwargs):
    print("stalled", flush=True)
    time.sleep(600)
setattr(module, sys.argv[2], stall)
module.save(builders.mtp_model(seed=1), sys.argv[1], wmtp_type="base_model",
            algorithm_compatibility=["baseline-mtp"])
"""


@pytest.mark.parametrize("where", ["_write", "file_manifest"])  # the first file; the last
def test_a_save_killed_over_a_model_leaves_no_metadata_over_new_files(
    where: str, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(models["mtp"], tmp_path / "mtp")
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root)}
    with subprocess.Popen(
        [sys.executable, "-c", STALL, str(folder), where],
        stdout=subprocess.PIPE,
        cwd=root,
        env=env,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"stalled\n"
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (folder / "metadata.json").exists()
    with pytest.raises(wmtp.ModelFileError, match=r"metadata\.json does not exist"):
        wmtp.load(str(folder), trust_code=True)

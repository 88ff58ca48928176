"""AWS profiles and storage options per location, against the S3 test server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import wmtp
from tests.s3server import S3Server, storage_options, upload_folder
from tests.test_load import assert_equals_file, file_tensors
from wmtp import remote
from wmtp.cli import main
from wmtp.remote import open_remote, options_for

PROFILE = "wmtp-test"


@pytest.fixture(scope="module")
def uploaded(models: dict[str, Path], s3_server: S3Server) -> str:
    """The mtp model at `s3://bucket/opts/models/mtp`."""
    upload_folder(s3_server, models["mtp"], "opts/models/mtp")
    return f"s3://{s3_server.bucket}/opts/models/mtp"


@pytest.fixture(autouse=True)
def aws_env(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """No AWS_ variable but the test server's endpoint, and AWS files of this test alone (never
    the user's); nothing can reach the cloud (instance metadata off, endpoint on loopback)."""
    for name in [k for k in list(os.environ) if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    files = {"credentials": tmp_path / "aws-credentials", "config": tmp_path / "aws-config"}
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files["credentials"]))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(files["config"]))
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore's IMDS
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    remote._boto3_provider.cache_clear()
    return files


def write_profile(
    files: dict[str, Path], server: S3Server, *, secret: str | None = None, region: str = ""
) -> None:
    """Profile PROFILE with the server's keys (or `secret`) and, in the config file, `region`."""
    files["credentials"].write_text(
        f"[{PROFILE}]\naws_access_key_id = {server.access_key}\n"
        f"aws_secret_access_key = {secret or server.secret_key}\n"
        "[other]\naws_access_key_id = x\naws_secret_access_key = y\n"
    )
    files["config"].write_text(
        f"[profile {PROFILE}]\n" + (f"region = {region}\n" if region else "")
    )


def no_keys(server: S3Server) -> dict[str, str]:
    """The server's options without credentials (nor region)."""
    drop = {"access_key_id", "secret_access_key", "region"}
    return {k: v for k, v in storage_options(server).items() if k not in drop}


def test_aws_profile_from_environment_loads(
    models: dict[str, Path],
    uploaded: str,
    s3_server: S3Server,
    aws_env: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_profile(aws_env, s3_server, region="us-east-1")
    monkeypatch.setenv("AWS_PROFILE", PROFILE)
    model = wmtp.load(uploaded, storage_options=no_keys(s3_server), trust_code=True,
                      cache_dir=tmp_path / "cache")  # fmt: skip
    assert_equals_file(model, file_tensors(models["mtp"]))


def test_profile_option_loads_and_beats_environment_keys(
    models: dict[str, Path],
    uploaded: str,
    s3_server: S3Server,
    aws_env: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_profile(aws_env, s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    options = no_keys(s3_server) | {"profile": PROFILE}
    model = wmtp.load(uploaded, storage_options=options, trust_code=True, cache_dir=tmp_path)
    assert_equals_file(model, file_tensors(models["mtp"]))
    # $AWS_PROFILE, though, loses to the environment's keys (as with the AWS CLI).
    monkeypatch.setenv("AWS_PROFILE", PROFILE)
    with pytest.raises(wmtp.StoreAccessError):
        wmtp.read_metadata(uploaded, storage_options=no_keys(s3_server))


def test_explicit_keys_beat_the_profile(
    uploaded: str, s3_server: S3Server, aws_env: dict[str, Path]
) -> None:
    write_profile(aws_env, s3_server, secret="wrong-secret")
    right = storage_options(s3_server) | {"profile": PROFILE}
    assert wmtp.read_metadata(uploaded, storage_options=right).wmtp_type == "base_model"
    with pytest.raises(wmtp.StoreAccessError):  # the profile's own keys are wrong
        wmtp.read_metadata(uploaded, storage_options=no_keys(s3_server) | {"profile": PROFILE})


def test_region_comes_from_the_profile_unless_given(
    s3_server: S3Server, aws_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def region(options: dict[str, str]) -> Any:
        store: Any = open_remote("s3://bucket/x", options)  # no request is sent
        return store.config.get("region")

    write_profile(aws_env, s3_server, region="eu-west-3")
    options = no_keys(s3_server) | {"profile": PROFILE}
    assert region(options) == "eu-west-3"
    assert region(options | {"region": "ap-south-1"}) == "ap-south-1"
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    assert region(options) is None  # not the profile's: obstore takes AWS_REGION itself
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert region(options) == "ca-central-1"


def test_unknown_profile_names_it_and_the_files(
    uploaded: str, s3_server: S3Server, aws_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(aws_env, s3_server)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.read_metadata(uploaded, storage_options=no_keys(s3_server))
    message = str(err.value)
    assert "'no-such-profile' (AWS_PROFILE) does not exist" in message
    assert str(aws_env["credentials"]) in message and str(aws_env["config"]) in message
    assert f"profiles: {PROFILE}, other" in message


def test_profile_without_credentials_is_an_option_error(
    uploaded: str, s3_server: S3Server, aws_env: dict[str, Path]
) -> None:
    aws_env["config"].write_text("[profile bare]\nregion = us-east-1\n")
    with pytest.raises(wmtp.OptionError, match=r"'bare' .*gives no credentials"):
        wmtp.read_metadata(uploaded, storage_options=no_keys(s3_server) | {"profile": "bare"})


def test_profile_without_boto3_names_the_extra(
    uploaded: str, s3_server: S3Server, aws_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(aws_env, s3_server)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(wmtp.OptionError, match=r'pip install "wmtp\[aws\]"'):
        wmtp.read_metadata(uploaded, storage_options=no_keys(s3_server) | {"profile": PROFILE})


def test_no_profile_keeps_the_environment_path(
    uploaded: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # never needed without a profile
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert wmtp.read_metadata(uploaded, storage_options={}).wmtp_type == "base_model"
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")  # the environment's keys win
    assert wmtp.read_metadata(uploaded).wmtp_type == "base_model"


def test_profile_option_is_for_s3_only() -> None:
    with pytest.raises(wmtp.OptionError, match="s3://"):
        open_remote("gs://bucket/model", {"profile": PROFILE})


def test_longest_prefix_wins(
    models: dict[str, Path], uploaded: str, s3_server: S3Server, tmp_path: Path
) -> None:
    right, bucket = storage_options(s3_server), f"s3://{s3_server.bucket}"
    wrong = right | {"secret_access_key": "wrong-secret"}
    options: dict[str, Any] = {f"{bucket}/": wrong, f"{bucket}/opts/": right}
    model = wmtp.load(uploaded, storage_options=options, trust_code=True, cache_dir=tmp_path)
    assert_equals_file(model, file_tensors(models["mtp"]))
    swapped: dict[str, Any] = {f"{bucket}/": right, f"{bucket}/opts/": wrong}
    with pytest.raises(wmtp.StoreAccessError):
        wmtp.read_metadata(uploaded, storage_options=swapped)
    # A prefix matches whole path segments only: `opt` is not a folder above the model.
    partial: dict[str, Any] = {f"{bucket}/": right, f"{bucket}/opt": wrong}
    assert wmtp.read_metadata(uploaded, storage_options=partial).wmtp_type == "base_model"


def test_candidates_mixing_a_bucket_and_a_folder(
    models: dict[str, Path],
    uploaded: str,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, local = f"s3://{s3_server.bucket}/", str(models["gpt2_reward"])
    options: dict[str, Any] = {bucket: storage_options(s3_server), "https://elsewhere/": {}}
    chosen = wmtp.resolve_roles("critic-wmtp", [local, uploaded], storage_options=options)
    assert chosen == {"base_model": uploaded, "reward_model": local}
    assert wmtp.resolve("critic-wmtp", [uploaded, local], storage_options=options) == uploaded
    loaded = wmtp.load_roles("critic-wmtp", [uploaded, local], storage_options=options,
                             trust_code=True, cache_dir=tmp_path)  # fmt: skip
    assert_equals_file(loaded["base_model"], file_tensors(models["mtp"]))
    assert_equals_file(loaded["reward_model"], file_tensors(models["gpt2_reward"]))
    # Under no prefix, the bucket gets the environment alone: here, keys that do not work.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    elsewhere: dict[str, Any] = {"s3://another-bucket/": storage_options(s3_server)}
    with pytest.raises(wmtp.NoCompatibleModelError, match="StoreAccessError"):
        wmtp.resolve("critic-wmtp", [uploaded, local], role="base_model", storage_options=elsewhere)


def test_mixing_flat_keys_and_prefixes_is_an_option_error(uploaded: str) -> None:
    mixed: dict[str, Any] = {"region": "us-east-1", "s3://bucket/": {"region": "us-east-1"}}
    with pytest.raises(wmtp.OptionError, match="mixes URL prefixes"):
        wmtp.load(uploaded, storage_options=mixed)
    with pytest.raises(wmtp.OptionError, match="must be a mapping"):
        options_for("s3://bucket/x", {"s3://bucket/": "region=us-east-1"})


def test_options_for() -> None:
    flat = {"region": "eu-west-1"}
    assert options_for("s3://b/m", flat) == flat
    assert options_for("s3://b/m", None) == {}
    table: dict[str, Any] = {"s3://b": {"a": "1"}, "s3://b/m/": {"a": "2"}, "https://h/": {}}
    assert options_for("s3://b/m", table) == {"a": "2"}  # the location itself, as a prefix
    assert options_for("s3://b/m/x/", table) == {"a": "2"}
    assert options_for("s3://b/mx", table) == {"a": "1"}
    assert options_for("s3://bb/m", table) == {}
    assert options_for("https://h/path", table) == {}


def test_cache_folder_follows_the_locations_endpoint() -> None:
    meta = {"e_tag": "abc"}
    flat = {"endpoint": "http://127.0.0.1:1"}
    table: dict[str, Any] = {"s3://b/": flat, "s3://c/": {"endpoint": "http://127.0.0.1:2"}}
    folder = remote._folder("s3://b/m", table, meta)
    assert folder == remote._folder("s3://b/m", flat, meta)
    assert folder != remote._folder("s3://b/m", {"endpoint": "http://127.0.0.1:2"}, meta)


def test_cli_takes_a_profile(
    uploaded: str,
    s3_server: S3Server,
    aws_env: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_profile(aws_env, s3_server)
    args = [f"-o{k}={v}" for k, v in no_keys(s3_server).items()]
    command = ["resolve", "baseline-mtp", uploaded, "--json", *args]
    assert main([*command, f"-oprofile={PROFILE}"]) == 0
    assert json.loads(capsys.readouterr().out)["roles"]["base_model"]["location"] == uploaded
    assert main([*command, "-oprofile=no-such-profile"]) == 1
    assert "AWS profile 'no-such-profile' (storage option profile)" in capsys.readouterr().out

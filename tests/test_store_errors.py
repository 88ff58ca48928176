"""Store errors name the right thing: the scheme's own credentials, a missing bucket or
container, the server's own error code, an http:// endpoint that needs allow_http. Against
the S3 test server and stand-ins for GCS and Azure (`tests/fakestores.py`), all on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest
from obstore import exceptions as obx

import wmtp
from tests.fakestores import Canned, FakeGCS
from tests.s3server import S3Server, storage_options
from tests.test_save_remote import ROLE, gpt2
from wmtp.hints import store_error
from wmtp.migrate import migrate

AWS = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (storage options access_key_id / "
    "secret_access_key, or profile) and the rights they grant"
)
GOOGLE = (
    "check GOOGLE_SERVICE_ACCOUNT or GOOGLE_SERVICE_ACCOUNT_KEY (storage options "
    "service_account / service_account_key, or bearer_token) and the rights they grant"
)
AZURE = (
    "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (storage options "
    "account_name / account_key, or sas_key) and the rights they grant"
)
HTTP = (
    "an http(s):// store sends no credentials: the URL itself must grant access (as a "
    "presigned URL does)"
)
AZURE_SCHEMES = ["az://models/m", "abfs://models/m", "abfss://models@acct.dfs.core.windows.net/m"]
AZURE_SCHEMES += ["azure://models/m", "adl://models/m"]
# Azure's answers (its message carries a request id and time on further lines).
AZURE_ERROR = (
    '<?xml version="1.0" encoding="utf-8"?><Error><Code>{}</Code><Message>{}\n'
    "RequestId:5c1a7d2e-001e-0042-1b2c-3d4e5f000000\nTime:2026-12-06T10:00:00.0000000Z"
    "</Message></Error>"
)
AUTHORIZATION_FAILURE = AZURE_ERROR.format(
    "AuthorizationFailure", "This request is not authorized to perform this operation."
)
CONTAINER_NOT_FOUND = AZURE_ERROR.format(
    "ContainerNotFound", "The specified container does not exist."
)
# GCS's JSON API (and emulators speaking it) answer errors in JSON.
GCS_JSON_NOT_FOUND = json.dumps(
    {
        "error": {
            "code": 404,
            "message": "The specified bucket does not exist.",
            "errors": [
                {
                    "message": "The specified bucket does not exist.",
                    "domain": "global",
                    "reason": "notFound",
                }
            ],
        }
    }
)
GCS_JSON_UNAUTHENTICATED = json.dumps(
    {
        "error": {
            "code": 401,
            "message": "Invalid Credentials",
            "errors": [
                {"message": "Invalid Credentials", "domain": "global", "reason": "authError"}
            ],
        }
    }
)
S3_INTERNAL = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We '
    "encountered an internal error. Please try again.</Message></Error>"
)


def azure_options(endpoint: str) -> dict[str, str]:
    """An account key (base64) signs every request locally: no credential service is asked."""
    return {
        "endpoint": f"{endpoint}/acct",
        "account_name": "acct",
        "account_key": "d210cC10ZXN0LWtleQ==",
        "allow_http": "true",
        "max_retries": "0",
    }


@pytest.fixture
def opts(s3_server: S3Server) -> dict[str, str]:
    return storage_options(s3_server)


def load_error(url: str, options: dict[str, str]) -> wmtp.WmtpError:
    with pytest.raises(wmtp.WmtpError) as err:
        wmtp.load(url, storage_options=options)
    return err.value


# -- access denied: the scheme's own settings, the server's own code --------------------------


@pytest.mark.parametrize("scheme", ["s3", "s3a"])
def test_s3_access_denied_shows_the_servers_code_and_aws_settings(
    s3_server: S3Server, opts: dict[str, str], scheme: str
) -> None:
    url = f"{scheme}://{s3_server.bucket}/models/m"
    error = load_error(url, opts | {"secret_access_key": "wrong-secret"})
    assert isinstance(error, wmtp.StoreAccessError)
    assert str(error) == (
        f"{url}/metadata.json: access denied (SignatureDoesNotMatch: The request signature we "
        "calculated does not match the signature you provided. Check your key and signing "
        f"method.); {AWS}"
    )


def test_gcs_access_denied_names_google_settings() -> None:
    with FakeGCS() as gcs:
        error = load_error("gs://wmtp-test/m", gcs.options(bearer_token="expired"))
    assert isinstance(error, wmtp.StoreAccessError)
    assert str(error) == (
        f"gs://wmtp-test/m/metadata.json: access denied (AccessDenied: Access denied.); {GOOGLE}"
    )


def test_gcs_json_error_is_read_too() -> None:
    with Canned(401, GCS_JSON_UNAUTHENTICATED, "application/json") as server:
        options = {"base_url": server.endpoint, "bearer_token": "t", "allow_http": "true"}
        error = load_error("gs://models/m", options)
    assert isinstance(error, wmtp.StoreAccessError)
    assert str(error) == (
        f"gs://models/m/metadata.json: access denied (authError: Invalid Credentials); {GOOGLE}"
    )


@pytest.mark.parametrize("url", AZURE_SCHEMES)
def test_azure_access_denied_names_azure_settings(url: str) -> None:
    with Canned(403, AUTHORIZATION_FAILURE) as server:
        error = load_error(url, azure_options(server.endpoint))
        assert server.requests[0][:2] == ("GET", "/acct/models/m/metadata.json")
    assert isinstance(error, wmtp.StoreAccessError)
    assert str(error) == (
        f"{url}/metadata.json: access denied (AuthorizationFailure: This request is not "
        f"authorized to perform this operation.); {AZURE}"
    )


def test_http_access_denied_says_no_credentials_are_sent() -> None:
    body = '<?xml version="1.0"?><Error><Code>AccessDenied</Code><Message>Request has expired'
    with Canned(403, body + "</Message></Error>") as server:
        url = f"{server.endpoint}/models/m"
        error = load_error(url, {"max_retries": "0"})
    assert str(error) == (
        f"{url}/metadata.json: access denied (AccessDenied: Request has expired); {HTTP}"
    )


@pytest.mark.parametrize(
    ("url", "how"),
    [
        ("s3://b/m", AWS),
        ("s3a://b/m", AWS),
        ("https://s3.eu-west-1.amazonaws.com/b/m", AWS),
        ("https://b.r2.cloudflarestorage.com/m", AWS),
        ("gs://b/m", GOOGLE),
        *[(url, AZURE) for url in AZURE_SCHEMES],
        ("https://acct.blob.core.windows.net/c/m", AZURE),
        ("https://acct.dfs.core.windows.net/c/m", AZURE),
        ("http://host/m", HTTP),
        ("https://host/m", HTTP),
        ("file:///srv/m", "check the file's permissions"),
        ("/srv/m", "check the file's permissions"),
    ],
)
def test_every_scheme_obstore_takes_gets_its_own_credentials(url: str, how: str) -> None:
    refused = obx.PermissionDeniedError(
        "The operation lacked the necessary privileges to complete for path m: Error performing "
        "GET http://h/m in 1ms - Server returned non-2xx status code: 403 Forbidden: \n\n"
        "Debug source: ..."
    )
    error = store_error(url, refused)
    assert isinstance(error, wmtp.StoreAccessError)
    assert str(error).endswith(f"); {how}")


def test_server_error_shows_its_code_not_the_xml() -> None:
    with Canned(500, S3_INTERNAL) as server:
        keys = {"access_key_id": "a", "secret_access_key": "b", "allow_http": "true"}
        error = load_error("s3://b/m", keys | {"endpoint": server.endpoint, "max_retries": "0"})
    assert isinstance(error, wmtp.FetchError)
    assert str(error) == (
        "s3://b/m/metadata.json: InternalError: We encountered an internal error. Please try again."
    )


# -- a missing bucket or container is said to be one, by load, resolve, save and migrate --------


NO_BUCKET = (
    "the bucket 'no-such-bucket' does not exist (NoSuchBucket: The specified bucket does not "
    "exist); check the bucket name in the URL, and the endpoint"
)


def test_load_says_the_bucket_does_not_exist(opts: dict[str, str]) -> None:
    error = load_error("s3://no-such-bucket/models/m", opts)
    assert isinstance(error, wmtp.ModelFileError)
    assert str(error) == f"s3://no-such-bucket/models/m/metadata.json: {NO_BUCKET}"


def test_resolve_says_the_bucket_does_not_exist(opts: dict[str, str]) -> None:
    with pytest.raises(wmtp.NoCompatibleModelError) as err:
        wmtp.resolve("rho1-wmtp", ["s3://no-such-bucket/m"], storage_options=opts)
    assert str(err.value) == (
        f"no candidate serves 'rho1-wmtp':\n  s3://no-such-bucket/m: ModelFileError: "
        f"s3://no-such-bucket/m/metadata.json: {NO_BUCKET}"
    )


def test_save_says_the_bucket_does_not_exist(opts: dict[str, str]) -> None:
    with pytest.raises(wmtp.ModelFileError) as err:
        wmtp.save(gpt2(), "s3://no-such-bucket/saved", **ROLE, storage_options=opts)
    assert str(err.value) == f"s3://no-such-bucket/saved/config.json: {NO_BUCKET}"


def test_migrate_says_the_bucket_does_not_exist(opts: dict[str, str]) -> None:
    with pytest.raises(wmtp.ModelFileError) as err:
        migrate("s3://no-such-bucket/m", storage_options=opts)
    assert str(err.value) == f"s3://no-such-bucket/m: {NO_BUCKET}"


def test_gcs_missing_bucket() -> None:
    with FakeGCS() as gcs:
        error = load_error("gs://other-bucket/m", gcs.options())
        with pytest.raises(wmtp.ModelFileError) as err:
            wmtp.save(gpt2(), "gs://other-bucket/saved", **ROLE, storage_options=gcs.options())
    assert str(error) == (
        "gs://other-bucket/m/metadata.json: the bucket 'other-bucket' does not exist "
        "(NoSuchBucket: The specified bucket does not exist.); check the bucket name in the URL, "
        "and the endpoint"
    )
    assert str(err.value).startswith(
        "gs://other-bucket/saved/config.json: the bucket 'other-bucket' does not exist"
    )


def test_gcs_json_missing_bucket() -> None:
    with Canned(404, GCS_JSON_NOT_FOUND, "application/json") as server:
        options = {"base_url": server.endpoint, "bearer_token": "t", "allow_http": "true"}
        error = load_error("gs://models/m", options)
    assert str(error) == (
        "gs://models/m/metadata.json: the bucket 'models' does not exist (notFound: The "
        "specified bucket does not exist.); check the bucket name in the URL, and the endpoint"
    )


@pytest.mark.parametrize("url", AZURE_SCHEMES)
def test_azure_missing_container(url: str) -> None:
    with Canned(404, CONTAINER_NOT_FOUND) as server:
        error = load_error(url, azure_options(server.endpoint))
    assert isinstance(error, wmtp.ModelFileError)
    assert str(error) == (
        f"{url}/metadata.json: the container 'models' does not exist (ContainerNotFound: The "
        "specified container does not exist.); check the container name in the URL, and the "
        "endpoint"
    )


def test_missing_file_in_a_bucket_still_gets_the_example(
    opts: dict[str, str], s3_server: S3Server
) -> None:
    url = f"s3://{s3_server.bucket}/nothing-here"
    error = load_error(url, opts)
    assert str(error).startswith(
        f"{url}/metadata.json does not exist: every model folder needs a metadata.json; "
        f"`wmtp migrate --write {url} --role ROLE` writes one"
    )
    assert '"loading_strategy"' in str(error)


# -- an http:// endpoint without allow_http ----------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("url", ["gs://b/m", "s3://b/m", "az://c/m"])
def test_http_endpoint_without_allow_http_gets_a_hint(url: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    options = {
        "gs": {"base_url": endpoint, "bearer_token": "t"},
        "s3": {"endpoint": endpoint, "access_key_id": "a", "secret_access_key": "b"},
        "az": azure_options(endpoint) | {"endpoint": endpoint},
    }[url[:2]]
    options.pop("allow_http", None)
    error = load_error(url, options)
    assert isinstance(error, wmtp.OptionError)
    assert str(error) == (
        f"{url}/metadata.json: the endpoint {endpoint} is plain http, which is refused unless "
        "asked for: pass allow_http=true in storage_options for an http:// endpoint (CLI: -o "
        "allow_http=true)"
    )

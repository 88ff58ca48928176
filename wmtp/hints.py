"""Clear errors for bad input (metadata, files, options, stores): what, where and how to fix
it. Imported only when something is wrong; it imports nothing of wmtp but its exceptions, so
every module may use it."""

from __future__ import annotations

import difflib
import html
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import msgspec
import obstore
from obstore import exceptions as obx

from wmtp.errors import (
    FetchError,
    IntegrityError,
    MetadataError,
    ModelFileError,
    OptionError,
    PackageError,
    StoreAccessError,
    WeightsError,
    WmtpError,
)

EXAMPLE_STRATEGY: Final = """\
  "loading_strategy": {
    "loader_type": "huggingface",
    "transformers_class": "AutoModelForCausalLM",
    "state_dict_mapping": {"remove_prefix": null, "add_prefix": null, "key_transforms": {}},
    "required_files": ["config.json", "model.safetensors"]
  },
  "algorithm_compatibility": ["rho1-wmtp"]"""
EXAMPLE_METADATA: Final = (
    "it says how to load the model, e.g.\n"
    f'{{\n  "wmtp_type": "reference_model",\n  "storage_version": "2.0",\n{EXAMPLE_STRATEGY}\n}}'
)
# What to add to msgspec's message when it names this field (or says this).
_HINTS: Final = {
    # The values of `wmtp.metadata.LoaderType` and `WmtpType` (a test keeps them equal).
    "loader_type`": "expected one of 'custom_mtp', 'huggingface'",
    "wmtp_type`": "expected one of 'base_model', 'reference_model', 'reward_model'",
    "model_class_name`": 'custom_mtp needs it, e.g. "model_class_name": "DistilGPT2MTP"',
    "custom_module_file`": 'custom_mtp needs the module defining it, e.g. "modeling.py"',
    "transformers_class`": 'huggingface needs it, e.g. "AutoModelForCausalLM"',
    "matching regex": "name files relative to the model folder, without '..' or '.' parts, "
    "a leading '/', '//', '\\' or ':' (a module file ends in .py)",
}


def metadata_error(error: msgspec.MsgspecError, source: str) -> MetadataError:
    """msgspec's `error` decoding the metadata at `source`, with what to write instead."""
    if not isinstance(error, msgspec.ValidationError):  # a DecodeError that is not one
        return MetadataError(f"{source}: not valid JSON: {error}")
    message = str(error) + ("" if " - at `" in str(error) else " - at `$`")  # msgspec: no root
    if "missing required field `loading_strategy`" in message:
        return MetadataError(
            f"{source} has no `loading_strategy`, so there is no way to know how to load this "
            f"model (wmtp never guesses from the files present). Add one, for example:\n"
            f"{EXAMPLE_STRATEGY}\nwith loader_type `custom_mtp` (plus model_class_name and "
            "custom_module_file) for a model defined in the folder's own module."
        )
    return MetadataError(f"{source}: {readable(message)}")


def missing_files(location: str, found: Mapping[str, Any]) -> ModelFileError:
    """The error naming every required file that `found` (from `heads`) lacks, at once."""
    missing = ", ".join(repr(name) for name, meta in found.items() if meta is None)
    return ModelFileError(
        f"required file(s) {missing} not found at {location}; "
        "add them there, or remove them from loading_strategy.required_files"
    )


def no_metadata(error: ModelFileError) -> ModelFileError:
    """`error`, and when metadata.json is missing, the command that writes it and an example."""
    if not (text := str(error)).endswith("/metadata.json does not exist"):
        return error  # the folder or its bucket is missing, or the file is not a file
    folder = shlex.quote(text.removesuffix("/metadata.json does not exist"))
    return ModelFileError(
        f"{error}: every model folder needs a metadata.json; `wmtp migrate --write {folder} "
        "--role ROLE` writes one from the folder's config.json and checkpoint (ROLE: base_model, "
        f"reference_model or reward_model); {EXAMPLE_METADATA}"
    )


def unknown_settings(path: Path, unknown: Sequence[str], known: Iterable[str]) -> OptionError:
    """The error for config overrides the config does not have, with the closest names."""
    close = {k: difflib.get_close_matches(k, list(known), n=3) for k in unknown}
    hints = [f"{k!r} (closest: {', '.join(c) or 'none'})" for k, c in close.items()]
    return OptionError(f"{path} has no setting {'; '.join(hints)}: check config_overrides")


def readable(message: str) -> str:
    """msgspec's `message` with the path rule in words, and the allowed values or an example."""
    hints = [hint for words, hint in _HINTS.items() if words in message]
    return "; ".join([re.sub(r"matching regex '.*' -", "that is a path -", message), *hints])


# What to check when a store refuses access, by obstore's kind of store (`parse_scheme`).
_RIGHTS = "and the rights they grant"
CREDENTIALS: Final = {
    "s3": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (storage options access_key_id / "
    f"secret_access_key, or profile) {_RIGHTS}",
    "gcs": "check GOOGLE_SERVICE_ACCOUNT or GOOGLE_SERVICE_ACCOUNT_KEY (storage options "
    f"service_account / service_account_key, or bearer_token) {_RIGHTS}",
    "azure": "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (storage options "
    f"account_name / account_key, or sas_key) {_RIGHTS}",
    "http": "an http(s):// store sends no credentials: the URL itself must grant access (as a "
    "presigned URL does)",
    "local": "check the file's permissions",
}
# obstore's text for an HTTP error: `... status code: 404 Not Found: <body>\n\nDebug source: ...`
_STATUS: Final = re.compile(r"status code: \d{3}[^:\n]*: (.*?)(?:\n\nDebug source:|\Z)", re.S)
_MISSING: Final = re.compile(
    r"NoSuchBucket|ContainerNotFound|(bucket|container) does not exist", re.I
)


def server_said(error: BaseException) -> tuple[str, str]:
    """The error code and message the server sent in the body of an HTTP error (obstore puts
    the body in its text): the XML `<Code>` and `<Message>` of S3, GCS and Azure, or a JSON
    error (GCS's JSON API, OAuth); ("", "") when there is none."""
    if not (found := _STATUS.search(str(error))) or not (body := found[1].strip()):
        return "", ""
    if code := re.search(r"<Code>(.*?)</Code>", body, re.S):
        message = re.search(r"<Message>(.*?)</Message>", body, re.S)
        return html.unescape(code[1]), html.unescape(message[1] if message else "")
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "", ""
    inner = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(inner, str):  # OAuth: {"error": "invalid_grant", "error_description": ...}
        return inner, str(doc.get("error_description", ""))
    if not isinstance(inner, dict):
        return "", ""
    reasons = [e.get("reason") for e in inner.get("errors") or [] if isinstance(e, dict)]
    reason = next(iter(reasons), None) or inner.get("status") or inner.get("code") or ""
    return str(reason), str(inner.get("message", ""))


def _cause(error: BaseException) -> str:
    """What went wrong, in one line: the server's code and message, else obstore's first line."""
    code, message = server_said(error)
    if code:
        return f"{code}: {message.strip().splitlines()[0]}" if message.strip() else code
    return str(error).strip().partition("\n")[0] or type(error).__name__


def store_error(url: str, error: Exception) -> WmtpError:
    """The wmtp error for what a store (or the file system) raised while reading `url`."""
    text, cause = str(error), _cause(error)
    if _MISSING.search(" ".join(server_said(error))):
        return missing_bucket(url, error)
    if isinstance(error, obx.PreconditionError):
        return changed(url, error)
    if isinstance(error, FileNotFoundError):
        if re.search(r"Error performing (PUT|POST) ", text):
            return ModelFileError(f"{url} cannot be written: not found ({cause}; no such bucket?)")
        return ModelFileError(f"{url} does not exist")
    if "BadScheme" in text and (http := re.search(r"performing \w+ (http://[^/\s]+)", text)):
        return OptionError(
            f"{url}: the endpoint {http[1]} is plain http, which is refused unless asked for: "
            "pass allow_http=true in storage_options for an http:// endpoint (CLI: -o "
            "allow_http=true)"
        )
    if not isinstance(error, obx.PermissionDeniedError | obx.UnauthenticatedError):
        return FetchError(f"{url}: {cause}")
    try:
        kind: str = "local" if "://" not in url else obstore.parse_scheme(url)
    except obx.BaseError:
        kind = ""
    how = CREDENTIALS.get(kind, "check the store's credentials in storage_options")
    return StoreAccessError(f"{url}: access denied ({cause}); {how}")


def missing_bucket(url: str, error: BaseException) -> ModelFileError:
    """The error for a request to a bucket (Azure: container) the store does not have."""
    code, message = server_said(error)
    kind = "container" if "container" in f"{code} {message}".lower() else "bucket"
    # s3://bucket/..., abfss://container@account.../..., https://host/bucket/...
    parts = urlparse(url)
    name = parts.netloc.partition("@")[0]
    if parts.scheme in ("http", "https"):
        name = parts.path.lstrip("/").partition("/")[0]
    if found := re.search(r"<BucketName>(.*?)</BucketName>", str(error)):
        name = found[1]
    return ModelFileError(
        f"{url}: the {kind} {name!r} does not exist ({_cause(error)}); check the {kind} name "
        "in the URL, and the endpoint"
    )


def changed(url: str, error: BaseException) -> FetchError:
    """The error for an object replaced since it was first read (a request pinned to that
    version, by ETag or generation, was refused)."""
    return FetchError(f"{url} changed since it was first read ({_cause(error)}); run again")


def package_error(source: str, error: ImportError) -> PackageError:
    """The error for a package that does not import while the model at `source` is built,
    naming the package that failed first (transformers re-raises it under the class name)."""
    root: BaseException = error
    while isinstance(inner := root.__cause__ or root.__context__, ImportError):
        root = inner
    name = getattr(root, "name", None) or error.name or "a package"
    return PackageError(
        f"{source}: the model needs {name}, which does not import ({root}); install or repair "
        f"it (pip install {name.partition('.')[0]}), in a version that fits transformers"
    )


def stale_size(url: str, name: str, size: int, listed: int) -> IntegrityError:
    """The error for a file whose `size` is not the one the manifest lists."""
    return IntegrityError(
        f"{url} has {size} bytes, but metadata.json's manifest (`$.files[{name!r}].size`) says "
        f"{listed}; the file or the manifest is stale"
    )


def collision(first: str, second: str, key: str) -> WeightsError:
    """The error for two checkpoint keys that the mapping sends to one model `key`."""
    both = sorted((first, second))
    return WeightsError(
        f"`$.loading_strategy.state_dict_mapping` sends both {both[0]!r} and {both[1]!r} to "
        f"{key!r}; give each its own, or drop one (null)"
    )


def runaway(pattern: str, key: str) -> MetadataError:
    """The error for a key transform whose matching did not end in time."""
    return MetadataError(
        f"`$.loading_strategy.state_dict_mapping.key_transforms` {pattern!r} runs away (at key "
        f"{key!r}); rewrite it without nested repeats such as (a+)+"
    )


def unknown_model_type(path: Path, kind: object) -> MetadataError:
    """The error for a config.json whose `model_type` transformers does not know."""
    return MetadataError(
        f"{path}: `$.model_type` is {kind!r}, which transformers does not know; set it to the "
        'architecture the model builds on (e.g. "gpt2", "llama")'
    )


def unknown_dtype(dtype: object, aliases: Iterable[str]) -> OptionError:
    """The error for a `dtype=` that is no floating torch dtype."""
    words = "float32, bfloat16, float16, float64, half, double: integers are never cast"
    return OptionError(f"unknown dtype {dtype!r}; use {', '.join(aliases)}, {words}")


def no_checkpoint(required: Sequence[str]) -> str:
    """Why `required_files` lists no checkpoint wmtp loads (a `ValueError` message)."""
    pickles = ", ".join(f for f in required if f.endswith((".bin", ".pt")))
    why = f" ({pickles} is a pickle, which wmtp does not load)" if pickles else ""
    return (
        f"`required_files` lists no safetensors checkpoint{why}; save the weights as "
        "model.safetensors and list it"
    )


def unknown_quantization(name: object, valid: Sequence[str]) -> OptionError:
    """The error for a `quantization=` that bitsandbytes does not offer here."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return OptionError(
        f"unknown quantization {name!r}; use one of {', '.join(map(repr, valid))} (int8: "
        f"LLM.int8(); nf4, fp4: 4-bit), or None for full precision{hint}"
    )


def no_quant_package(name: str, error: ImportError) -> OptionError:
    """The error for a quantisation asked for without bitsandbytes installed."""
    return OptionError(
        f"quantization={name!r} needs bitsandbytes, which does not import ({error}); "
        'install it with pip install "wmtp[quant]"'
    )


def quantized_parallel(name: str) -> OptionError:
    """The error for `parallelize` together with a quantisation."""
    return OptionError(
        f"quantization={name!r} and parallelize cannot be combined: bitsandbytes' layers are "
        "not sharded by FSDP2 or tensor parallelism here; load a quantised model whole on each "
        "rank (quantization= alone), or shard it in full precision (parallelize= alone)"
    )


def unmatched_modules(names: Sequence[str], modules: Sequence[str], model: str) -> MetadataError:
    """The error for `keep_full_precision` names that match no module of the model."""
    close = {n: difflib.get_close_matches(n, modules, n=3) for n in names}
    hints = [f"{n!r} (closest: {', '.join(c) or 'none'})" for n, c in close.items()]
    return MetadataError(
        f"`$.loading_strategy.keep_full_precision` names no module of {model}: "
        f"{'; '.join(hints)}; give module names such as 'lm_head' or 'model.layers.0.mlp'"
    )


def bad_module_pattern(pattern: str, error: Exception) -> MetadataError:
    """The error for a `keep_full_precision` name that is no valid regular expression."""
    return MetadataError(
        f"`$.loading_strategy.keep_full_precision` {pattern!r} is no valid pattern ({error}); "
        "give a module name, with regular-expression characters escaped"
    )


def quantized_save(model: str, names: Sequence[str]) -> OptionError:
    """The error for saving a model whose weights bitsandbytes quantised."""
    return OptionError(
        f"{model} was loaded quantised ({len(names)} bitsandbytes weights, e.g. {names[0]!r}): "
        "wmtp.save writes full-precision checkpoints only, and the quantised weights cannot "
        "give them back exactly; save the model loaded without quantization="
    )

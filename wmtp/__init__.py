"""wmtp: load WMTP models (MTP base, reference and reward models) exactly as their metadata
says: `wmtp.load("examples/tiny-mtp")`, `wmtp.resolve("critic-wmtp", ["models/mtp", "models/rm"])`.
torch and transformers are imported only when a model is loaded."""

from importlib import import_module  # noqa: I001 (grouped by what they hold)
from typing import TYPE_CHECKING, Any

from wmtp.errors import (
    FetchError, IntegrityError, MetadataError, ModelFileError, NoCompatibleModelError,
    OptionError, PackageError, StoreAccessError, UntrustedCodeError, WeightsError, WmtpError,
)  # fmt: skip
from wmtp.build import remap_state_dict
from wmtp.load import LOADERS, load, resolve
from wmtp.metadata import LoadingStrategy, Metadata, StateDictMapping, decode_metadata
from wmtp.store import read_metadata
from wmtp.save import save

if TYPE_CHECKING:
    from wmtp.checkpoint import *  # noqa: F403 (its __all__: the training checkpoint calls)
    from wmtp.remote import cache_root
    from wmtp.roles import ALGORITHM_ROLES, load_roles, resolve_roles
    from wmtp.tokenizer import load_tokenizer
# What a training run needs besides `load`, and the cache's place, come on first use.
_LATER = dict.fromkeys(("ALGORITHM_ROLES", "load_roles", "resolve_roles"), "roles")
_LATER |= {"load_tokenizer": "tokenizer", "cache_root": "remote", "TrainingState": "checkpoint"}
_LATER |= {f"{verb}_checkpoint": "checkpoint" for verb in ("save", "load", "latest", "export")}


def __getattr__(name: str) -> Any:
    if name not in _LATER:
        raise AttributeError(f"module 'wmtp' has no attribute {name!r}")
    return getattr(import_module(f"wmtp.{_LATER[name]}"), name)


__all__ = [  # noqa: RUF022
    "LOADERS", "FetchError", "IntegrityError", "LoadingStrategy", "Metadata", "MetadataError",
    "ModelFileError", "NoCompatibleModelError", "OptionError", "PackageError", "StateDictMapping",
    "StoreAccessError", "UntrustedCodeError", "WeightsError", "WmtpError", "cache_root",
    "decode_metadata", "load", "read_metadata", "remap_state_dict", "resolve", "save",
    "ALGORITHM_ROLES", "load_roles", "load_tokenizer", "resolve_roles", "TrainingState",
    "export_checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint",
]  # fmt: skip

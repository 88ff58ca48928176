"""wmtp: load WMTP models (MTP base, reference and reward models) exactly as their metadata
says: `wmtp.load("examples/tiny-mtp")`, `wmtp.resolve("critic-wmtp", ["models/mtp", "models/rm"])`.
torch and transformers are imported only when a model is loaded."""

from wmtp.errors import (  # noqa: I001
    FetchError, IntegrityError, MetadataError, ModelFileError, NoCompatibleModelError,
    OptionError, StoreAccessError, UntrustedCodeError, WeightsError, WmtpError,
)  # fmt: skip
from wmtp.build import remap_state_dict
from wmtp.store import cache_root
from wmtp.load import LOADERS, load, resolve
from wmtp.metadata import LoadingStrategy, Metadata, StateDictMapping, decode_metadata
from wmtp.metadata import read_metadata
from wmtp.save import save

__all__ = [
    "LOADERS", "FetchError", "IntegrityError", "LoadingStrategy", "Metadata", "MetadataError",
    "ModelFileError", "NoCompatibleModelError", "OptionError", "StateDictMapping",
    "StoreAccessError", "UntrustedCodeError", "WeightsError", "WmtpError", "cache_root",
    "decode_metadata", "load", "read_metadata", "remap_state_dict", "resolve", "save",
]  # fmt: skip

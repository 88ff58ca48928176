"""wmtp: load WMTP models (MTP base, reference and reward models) exactly as their metadata says.

    >>> import wmtp
    >>> model = wmtp.load("examples/tiny-mtp")
    >>> wmtp.resolve("critic-wmtp", ["models/mtp", "models/rm"])

torch and transformers are imported only when a model is loaded.
"""

from wmtp.errors import (
    FetchError,
    IntegrityError,
    MetadataError,
    ModelFileError,
    NoCompatibleModelError,
    StoreAccessError,
    UntrustedCodeError,
    WeightsError,
    WmtpError,
)
from wmtp.fetch import cache_root
from wmtp.load import load, read_metadata
from wmtp.loaders import LOADERS
from wmtp.metadata import LoadingStrategy, Metadata, StateDictMapping, decode_metadata
from wmtp.remap import remap_state_dict
from wmtp.resolve import resolve
from wmtp.save import save

__all__ = [
    "LOADERS",
    "FetchError",
    "IntegrityError",
    "LoadingStrategy",
    "Metadata",
    "MetadataError",
    "ModelFileError",
    "NoCompatibleModelError",
    "StateDictMapping",
    "StoreAccessError",
    "UntrustedCodeError",
    "WeightsError",
    "WmtpError",
    "cache_root",
    "decode_metadata",
    "load",
    "read_metadata",
    "remap_state_dict",
    "resolve",
    "save",
]

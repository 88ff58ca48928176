"""wmtp's exceptions: one family under `WmtpError`, each also a built-in (`KeyError`...)."""


class WmtpError(Exception):
    """Base of every error wmtp raises on purpose; `problems` lists separate problems."""

    problems: tuple[str, ...] = ()


class MetadataError(WmtpError, ValueError):
    """metadata.json, or a file it names, says something that cannot be loaded."""


class OptionError(WmtpError, ValueError):
    """An argument or option (dtype, device, a storage option) has no valid value."""


class ModelFileError(WmtpError, FileNotFoundError):
    """A file the metadata needs is not at the model's location."""


class WeightsError(WmtpError, KeyError):
    """The checkpoint does not fit the model; `fix` is a mapping under which it does, if any."""

    fix: object = None

    def __str__(self) -> str:  # KeyError quotes its message; this one is prose
        return str(self.args[0]) if self.args else ""


class PackageError(WmtpError, ImportError):
    """A package the model needs is missing or does not import."""


class NoCompatibleModelError(WmtpError, LookupError):
    """`resolve` found no candidate that serves the algorithm."""


class FetchError(WmtpError, ConnectionError):
    """A store could not be read (unreachable, silent, an I/O error) or the cache written."""


class StoreAccessError(WmtpError, PermissionError):
    """The store refused the credentials (not retried)."""


class UntrustedCodeError(WmtpError, PermissionError):
    """A model's own Python module comes from a remote store and was not trusted."""


class IntegrityError(WmtpError, ValueError):
    """A file's size or SHA-256 differs from the metadata's manifest; nothing was kept."""

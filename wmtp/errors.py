"""The exceptions `wmtp` raises: one family under `WmtpError`, each also a built-in exception,
so callers catch either (`except wmtp.WmtpError` or `except FileNotFoundError`). Messages say
what went wrong, where (URL, file, JSON path, key) and how to fix it."""

from __future__ import annotations


class WmtpError(Exception):
    """Base of every error `wmtp` raises on purpose; `problems` lists separate problems."""

    problems: tuple[str, ...] = ()


class MetadataError(WmtpError, ValueError):
    """`metadata.json` (or a file it names) says something that cannot be loaded."""


class ModelFileError(WmtpError, FileNotFoundError):
    """A file the metadata needs is not at the model's location."""


class WeightsError(WmtpError, KeyError):
    """The checkpoint does not fit the model; `fix`, when set, is a `StateDictMapping`
    under which every key fits (tried, not guessed)."""

    fix: object = None

    def __str__(self) -> str:  # KeyError quotes its message; this one is prose
        return str(self.args[0]) if self.args else ""


class NoCompatibleModelError(WmtpError, LookupError):
    """`resolve` found no candidate that serves the requested algorithm."""


class FetchError(WmtpError, ConnectionError):
    """A remote store could not be reached or stopped answering; retries were spent."""


class StoreAccessError(WmtpError, PermissionError):
    """The store refused the credentials (a wrong secret is not retried)."""


class UntrustedCodeError(WmtpError, PermissionError):
    """A model's own Python module comes from a remote store and was not trusted."""


class IntegrityError(WmtpError, ValueError):
    """A file's size or SHA-256 differs from the metadata's manifest; nothing was kept."""

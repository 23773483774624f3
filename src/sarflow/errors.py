"""Errors that reach users: each names the file (or URI) at fault and the cause."""

from __future__ import annotations


class SarflowError(Exception):
    """Base class for every error sarflow reports to a user (exit code 2 in the CLI)."""


class InputError(SarflowError):
    """A bad input: names the file or URI and says what is wrong with it."""

    def __init__(self, where: str, cause: str):
        self.where = str(where)
        self.cause = cause
        super().__init__(f"{self.where}: {cause}")


class CatalogError(InputError):
    """The catalog itself is malformed (unknown keys, wrong types, bad values)."""


class StorageError(InputError):
    """An object store is unreachable, refuses the credentials, or lacks the bucket/object."""

"""Paths a user passes, made absolute once, at the door: every `sarflow` command (through
:mod:`sarflow.cli.common`) and every component body that takes a path as a string parameter.

A relative path means the working directory of whoever typed it. Resolved there, it stays
right wherever it travels next: into a Feast source (which Feast would resolve against its repo
folder), a DVC remote (which ``dvc remote add`` run in the data repository would resolve against
that repository), an MLflow tag, a JSON summary read later from another folder.

This module lives with the components (the lowest door room: the CLI may import it, the
library never does) and imports nothing but the standard library, so a component body can
import it on a cluster image and under ``kfp.local`` alike.
"""

from __future__ import annotations

import re
from pathlib import Path

# a URL with a scheme (s3://, gs://, http://, file://, ...): never a local path to resolve
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SQLITE = "sqlite:///"


def absolute(path: str | Path | None) -> str | None:
    """`path` as an absolute local path (``~`` expanded, relative to the working directory,
    symlinks resolved), as a string; a URL (``s3://...``) and ``""``/None (\"not given\")
    unchanged."""
    if path is None:
        return None
    text = str(path)
    if not text or _URL.match(text):
        return text
    return str(Path(text).expanduser().resolve())


def absolute_uri(uri: str | None) -> str | None:
    """An MLflow tracking URI whose database file is given relative to the working directory
    (``sqlite:///mlflow.db``) made absolute (``sqlite:////abs/mlflow.db``); any other URI (a
    server, an absolute SQLite file, ``""`` for the default) unchanged."""
    if not uri or not uri.startswith(_SQLITE):
        return uri
    rest = uri[len(_SQLITE):]
    db, sep, query = rest.partition("?")
    if not db or db.startswith("/") or db == ":memory:":
        return uri
    return _SQLITE + str(Path(db).expanduser().resolve()) + sep + query


def absolute_like(value):
    """`value` made absolute, keeping its type: a Path stays a Path, a str a str, a list a list
    (what a typer callback returns in place of what the user typed)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(absolute_like(v) for v in value)
    return Path(absolute(value)) if isinstance(value, Path) else absolute(value)

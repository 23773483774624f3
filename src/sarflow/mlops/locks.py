"""The promotion lock: one gate at a time per registered model, on every machine that shares the
registry.

Where the lock lives (`lock_uri`, params `promote.lock_uri`, else `$SARFLOW_PROMOTION_LOCK`):

- `postgresql://...` (or `postgresql+psycopg2://...`): a PostgreSQL session advisory lock keyed
  by the model's name. It spans pods, needs no table and no privilege beyond CONNECT, and is
  released by the server when the holder's connection ends, so a killed pod never leaves it held.
- a folder: a file lock in it (one machine, or a volume every pod mounts).
- unset: a PostgreSQL tracking URI is used as it is; a SQLite registry gets a file lock beside its
  database; a tracking server (http) gets a file lock in this machine's temp folder, with a
  warning that it serialises only this machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from sarflow.errors import InputError

LOCK_ENV = "SARFLOW_PROMOTION_LOCK"
DEFAULT_TIMEOUT_S = 900.0


class SingleMachineLockWarning(UserWarning):
    """The promotion lock serialises only the gates of this machine."""


def _is_postgres(uri: str) -> bool:
    return re.match(r"^postgres(ql)?(\+\w+)?://", uri) is not None


def advisory_key(name: str) -> int:
    """The model's lock key: a signed 64-bit integer (PostgreSQL's bigint) from its name."""
    return int.from_bytes(hashlib.sha256(f"sarflow.promote:{name}".encode()).digest()[:8], "big", signed=True)


def resolve_lock_uri(tracking_uri: str, lock_uri: str | None = None) -> str:
    """Where the lock of the gates against `tracking_uri` lives (see the module's docstring)."""
    lock_uri = lock_uri or os.environ.get(LOCK_ENV) or None
    if lock_uri:
        return lock_uri
    if _is_postgres(tracking_uri):
        return tracking_uri
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent)
    if tracking_uri.startswith(("http://", "https://")):
        warnings.warn(f"the promotion lock for {tracking_uri} is a file in this machine's temp folder: it does not "
                      f"serialise gates on other machines or pods; set {LOCK_ENV}=postgresql://... (or params "
                      "promote.lock_uri) to a database every gate reaches", SingleMachineLockWarning, stacklevel=3)
        return tempfile.gettempdir()
    return tempfile.gettempdir()  # a local file store: gates on this machine only


@contextmanager
def promotion_lock(name: str, tracking_uri: str, lock_uri: str | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S):
    """Holds the lock of `name`'s gate for the block; waits up to `timeout_s`, then fails naming
    the lock."""
    where = resolve_lock_uri(tracking_uri, lock_uri)
    if _is_postgres(where):
        with _advisory_lock(where, name, timeout_s):
            yield where
    else:
        with _file_lock(where, name, timeout_s):
            yield where


def _file_lock(folder: str, name: str, timeout_s: float):
    from filelock import FileLock, Timeout

    path = Path(folder) / f".promote-{name}.lock"
    if not path.parent.is_dir():
        raise InputError(folder, "the promotion lock's folder does not exist (params promote.lock_uri / "
                         f"${LOCK_ENV})")

    @contextmanager
    def held():
        try:
            with FileLock(str(path), timeout=timeout_s):
                yield
        except Timeout:
            raise InputError(str(path), f"another promotion of {name!r} held the lock for more than "
                             f"{timeout_s:.0f} s; rerun the gate when it is done") from None
    return held()


def _dsn(uri: str) -> str:
    """A SQLAlchemy-style URI (`postgresql+psycopg2://`) as libpq reads it (`postgresql://`)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", uri)


def _redacted(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


@contextmanager
def _advisory_lock(uri: str, name: str, timeout_s: float, poll_s: float = 0.2):
    import psycopg2

    try:
        conn = psycopg2.connect(_dsn(uri), connect_timeout=10)
    except psycopg2.Error as e:
        raise InputError(_redacted(uri), f"cannot reach the promotion lock's database: {str(e).strip()}") from None
    conn.autocommit = True
    key = advisory_key(name)
    try:
        deadline = time.monotonic() + timeout_s
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                if cur.fetchone()[0]:
                    break
                if time.monotonic() > deadline:
                    raise InputError(_redacted(uri), f"another promotion of {name!r} held the lock for more than "
                                     f"{timeout_s:.0f} s; rerun the gate when it is done")
                time.sleep(poll_s)
        try:
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()

"""Locations that are a local folder or an s3:// prefix (on the endpoint and keys of
:mod:`sarflow.data.storage`): joining, listing, and atomic writes (a file appears whole or not
at all)."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sarflow.errors import InputError


def is_remote(root: str | Path) -> bool:
    return str(root).startswith("s3://")


def join(root: str | Path, *parts: str) -> str | Path:
    """root/parts: a Path for a local root, an s3:// string for an S3 root."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return Path(root).joinpath(*parts)


def filesystem():
    from sarflow.data.storage import s3_filesystem  # imported on use: minio and s3fs only for s3:// roots

    return s3_filesystem()


def fs_path(path: str | Path) -> tuple[object | None, str]:
    """(filesystem, path) as pyarrow takes them: None and the path locally, s3fs and bucket/key on S3."""
    if is_remote(path):
        return filesystem(), str(path)[len("s3://"):]
    return None, str(path)


def exists(path: str | Path) -> bool:
    if is_remote(path):
        return filesystem().exists(str(path))
    return Path(path).exists()


def parquet_files(folder: str | Path) -> list[str | Path]:
    """The Parquet files directly in a folder (hidden and temporary ones left out), sorted."""
    if is_remote(folder):
        fs = filesystem()
        try:
            found = fs.glob(str(folder).rstrip("/")[len("s3://"):] + "/*.parquet")
        except FileNotFoundError:
            return []
        return sorted("s3://" + f for f in found if not f.rsplit("/", 1)[-1].startswith((".", "_")))
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith((".", "_")))


def check_root(root: str | Path) -> None:
    """An s3:// root must be in a bucket that exists (a clear error naming the URI, not a listing of nothing)."""
    if is_remote(root):
        from sarflow.data.storage import check_bucket

        check_bucket(str(root))


def publish_s3(local: str | Path, dest: str) -> None:
    """Uploads a finished local file to `dest` so that nothing is ever half-visible there: first to
    a `.partial-*` key beside dest's folder (outside every source folder), then one server-side copy."""
    fs = filesystem()
    key = dest[len("s3://"):]
    folder, name = key.rsplit("/", 1)
    tmp = f"{folder.rsplit('/', 1)[0]}/.partial-{uuid.uuid4().hex[:12]}/{name}"
    try:
        fs.put_file(str(local), tmp)
        fs.copy(tmp, key)
    finally:
        try:
            fs.rm(tmp)
        except FileNotFoundError:
            pass


def write_atomic(dest: str | Path, write) -> str | Path:
    """`write(tmp)` a file, then publish it at `dest` whole: a temp file beside it and a rename
    locally (its folder made), one server-side copy on S3 (`publish_s3`)."""
    if is_remote(dest):
        with tempfile.TemporaryDirectory(prefix="sarflow-") as d:
            local = Path(d) / Path(str(dest)).name
            write(local)
            publish_s3(local, str(dest))
        return dest
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.partial-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def write_table_atomic(table: pa.Table, dest: str | Path, **kwargs) -> str | Path:
    """Writes one Parquet file at dest whole (`write_atomic`)."""
    return write_atomic(dest, lambda tmp: _write_table(table, tmp, **kwargs))


def _write_table(table: pa.Table, where, **kwargs) -> None:
    pq.write_table(table, where, **kwargs)


def check_output_folder(folder: str | Path, where: str, retry: str) -> None:
    """A local output folder can be written (before any work, creating nothing): its nearest existing
    ancestor must be a folder we can create files in; a path under a regular file, or a read-only place,
    is refused naming that folder. `where` names the output in the error, `retry` says what to do."""
    import errno

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".sarflow-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(where, f"cannot write into the output folder {folder} ({e.filename or existing}: "
                                f"{e.strerror or e}); nothing was written; {retry}") from None

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


def write_table_atomic(table: pa.Table, dest: str | Path, **kwargs) -> str | Path:
    """Writes one Parquet file at dest, locally (temp file + rename) or on S3 (see publish_s3)."""
    if is_remote(dest):
        with tempfile.TemporaryDirectory(prefix="sarflow-") as d:
            local = Path(d) / "part.parquet"
            _write_table(table, local, **kwargs)
            publish_s3(local, str(dest))
        return dest
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-", suffix=".tmp")
    os.close(fd)
    try:
        _write_table(table, tmp, **kwargs)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _write_table(table: pa.Table, where, **kwargs) -> None:
    pq.write_table(table, where, **kwargs)

"""What a chip store wrote, and proof that it is all still there.

`record(store)` lists every shard of every array and the chip table, with size and SHA-256, in
`integrity.json` at the store's root (the tiler's finalize writes it before the group's
attributes, taking each shard's hash from the unit that wrote it, so a store on S3 is not read
back; `sarflow verify STORE --record` adds it to an older store). `verify(store, full)`
compares the store with it: fast = every recorded file present with its size, full = hashes
too. `check_store(store)` is the fast check every reader runs when it opens a store
(`chipstore.open_chip_group`): a missing or truncated shard is refused, naming the shard, its
array and the chips it holds, instead of reading as NaN.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sarflow.data.paths import is_remote
from sarflow.errors import InputError

INTEGRITY = "integrity.json"
CHIPS_TABLE = "chips.parquet"
_SKIP = ("zarr.json", INTEGRITY)  # metadata is checked by parsing it; the record does not record itself


@dataclass(frozen=True)
class Problem:
    path: str                       # relative to the store's root
    cause: str
    array: str | None = None
    chips: tuple[int, int] | None = None  # [start, stop) of the chips in that shard

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (array {self.array}, chips {self.chips[0]}..{self.chips[1] - 1})"
                                  if self.array and self.chips else "")
        return f"{where}: {self.cause}"


class _Files:
    """A store's files on a local path or s3://: relative path -> size, bytes of one file."""

    def __init__(self, store: str | Path):
        self.uri = str(store).rstrip("/")
        self.remote = is_remote(self.uri)
        if self.remote:
            from sarflow.data.paths import filesystem

            self.fs = filesystem()
            self.base = self.uri[len("s3://"):]

    def sizes(self) -> dict[str, int]:
        if self.remote:
            found = self.fs.find(self.base, detail=True)
            return {k[len(self.base) + 1:]: int(v["size"]) for k, v in found.items()}
        root = Path(self.uri)
        out = {}
        for d, _, files in os.walk(root):
            for f in files:
                p = Path(d, f)
                out[p.relative_to(root).as_posix()] = p.stat().st_size
        return out

    def read(self, rel: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(f"{self.base}/{rel}")
        return Path(self.uri, rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(f"{self.base}/{rel}", data)
            return
        tmp = Path(self.uri, f".{rel}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, Path(self.uri, rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(f"{self.base}/{rel}") if self.remote else Path(self.uri, rel).is_file()


def _recorded(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name not in _SKIP and not name.startswith(".") and not rel.startswith(("_", "."))


def _sha256(files: _Files, rels: list[str], workers: int) -> dict[str, str]:
    """Hashes in threads (reading and SHA-256 of large buffers release the GIL)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(rels, pool.map(lambda r: hashlib.sha256(files.read(r)).hexdigest(), rels)))


def record(store: str | Path, workers: int | None = None, known: dict[str, list] | None = None) -> dict:
    """Writes `integrity.json`: every shard and the chip table, with size and SHA-256. `known`: path ->
    [size, sha256] of files whose bytes the caller wrote and hashed (the tiler's units); such a file
    is listed, not read, when the store holds it at that size. Every other file is read and hashed."""
    files = _Files(store)
    sizes = {k: v for k, v in files.sizes().items() if _recorded(k)}
    known = {k: v[1] for k, v in (known or {}).items() if k in sizes and sizes[k] == v[0]}
    hashes = known | _sha256(files, sorted(set(sizes) - set(known)), workers or min(8, (os.cpu_count() or 1) * 2))
    doc = {"format": 1, "algorithm": "sha256",
           "files": {k: {"size": sizes[k], "sha256": hashes[k]} for k in sorted(sizes)}}
    files.write(INTEGRITY, json.dumps(doc, indent=0).encode())
    _VERIFIED.clear()
    return doc


def _shard_chips(files: _Files, rel: str, meta_cache: dict) -> tuple[str | None, tuple[int, int] | None]:
    """The array a shard belongs to and the chips it holds ([start, stop) along the chip axis)."""
    parts = rel.split("/")
    if "c" not in parts:
        return None, None
    at = parts.index("c")
    array = "/".join(parts[:at])
    if array not in meta_cache:
        try:
            meta = json.loads(files.read(f"{array}/zarr.json"))
            meta_cache[array] = (int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]), int(meta["shape"][0]))
        except Exception:  # noqa: BLE001 - the metadata's own problem is reported by its reader
            meta_cache[array] = None
    if meta_cache[array] is None or at + 1 >= len(parts):
        return array, None
    per, n = meta_cache[array]
    i = int(parts[at + 1])
    return array, (i * per, min((i + 1) * per, n))


def load_record(store: str | Path) -> dict | None:
    files = _Files(store)
    if not files.exists(INTEGRITY):
        return None
    try:
        return json.loads(files.read(INTEGRITY))
    except ValueError as e:
        raise InputError(f"{files.uri}/{INTEGRITY}", f"the integrity record is damaged ({e}); "
                         f"rewrite it with `sarflow verify {files.uri} --record` once the store is known good") from None


def verify(store: str | Path, full: bool = False, workers: int | None = None) -> list[Problem] | None:
    """Problems found (empty: intact), or None when the store has no integrity record."""
    files = _Files(store)
    doc = load_record(store)
    if doc is None:
        return None
    recorded = doc["files"]
    sizes = files.sizes()
    problems, metas = [], {}
    for rel, want in recorded.items():
        if rel not in sizes:
            cause = "missing"
        elif sizes[rel] != want["size"]:
            cause = f"truncated or rewritten: {sizes[rel]} bytes, {want['size']} recorded"
        else:
            continue
        problems.append(Problem(rel, cause, *_shard_chips(files, rel, metas)))
    if full:
        present = [r for r in recorded if r in sizes and sizes[r] == recorded[r]["size"]]
        for rel, h in _sha256(files, present, workers or min(8, (os.cpu_count() or 1) * 2)).items():
            if h != recorded[rel]["sha256"]:
                problems.append(Problem(rel, "content differs from the recorded SHA-256", *_shard_chips(files, rel, metas)))
    for rel in sorted(set(k for k in sizes if _recorded(k)) - set(recorded)):
        problems.append(Problem(rel, "not in the integrity record (written after the store was finished)",
                                *_shard_chips(files, rel, metas)))
    return sorted(problems, key=lambda p: p.path)


_VERIFIED: set[tuple[str, str]] = set()  # (store, record stamp) found intact by this process: not listed again


def _fast_check(uri: str, stamp: str) -> tuple[Problem, ...]:
    if (uri, stamp) in _VERIFIED:
        return ()
    problems = tuple(p for p in verify(uri) or () if not p.cause.startswith("not in the integrity record"))
    if not problems:
        _VERIFIED.add((uri, stamp))
    return problems


def check_store(store: str | Path) -> None:
    """Refuses a store with a missing or truncated file, naming them (the reader's fast check;
    a store without a record passes: it predates records)."""
    files = _Files(store)
    if files.remote:
        stamp = str(files.fs.info(f"{files.base}/{INTEGRITY}").get("ETag")) if files.exists(INTEGRITY) else ""
    else:
        p = Path(files.uri, INTEGRITY)
        stamp = f"{p.stat().st_mtime_ns}" if p.is_file() else ""
    if not stamp:
        return
    problems = _fast_check(files.uri, stamp)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(files.uri, f"the store is damaged: {shown}. Rebuild it (`sarflow tile CATALOG --out "
                                    f"{files.uri}` into a new folder) or restore it from its DVC version; "
                                    f"`sarflow verify {files.uri} --full` lists every problem")

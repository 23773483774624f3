"""Tiling in three steps, so separate processes (pods) can write one store: plan, units, finalize.

- `plan(catalog, out, options)` ingests the catalog, fixes the grid and every chip's index (it
  finds the chips with a valid pixel in each required source, so any unit can be written on its
  own: from the source pixels where they settle it, data/screen.py, else by warping the block as
  a unit will), creates the arrays (shape final from the start) and cuts the chips into work
  units of whole shards (zarr: ONE writer per shard; data/shards.py writes a shard in one piece). The build state lives under
  `_build/` in the store: `plan.json` (written last: its presence means the plan is complete),
  the kept chips (`chips.npy`), the ingested catalog (`ingested.pkl`) and the inputs' manifest.
  The plan is itself three steps, so its screening (reading every required source once: a few
  percent of tiling's CPU, but one process) can fan out too: `survey(catalog, out, options, parts)`
  ingests and cuts the grid's blocks into `parts` screening parts (`survey.json`), `screen_part(out,
  part)` screens one part's blocks (any process; `screen/`, a file per part named by its survey) and `commit_plan(out)` screens
  the parts no process did and writes the plan. A chip's screening depends on that chip alone, so
  the plan does not depend on the parts. Before the survey, the inputs' checksums can fan out the same
  way: `checksum_part(catalog, out, part, parts)` hashes one of `parts` shares of the input bytes
  (`checksum_shares`) and records the checksums with the files' stamps (`_build/checksums/`). The survey takes a recorded checksum for
  every file whose size and stamp are unchanged instead of reading it again, and records its own, so
  a build resumed after its survey reads no input again for them.
- `write_unit(out, unit)` warps the whole blocks its chips fall in (blocks of about `window_px` pixels), writes its
  shards straight into the store, then its rows of chips.parquet (`_build/units/NNNNNN.parquet`), its
  train chips' sums (`NNNNNN.npz`) and last its report (`NNNNNN.json`: shard hashes, the train chips'
  counts, min, max and class counts, its outlines' bbox and geometry types). A rerun of a unit (after
  kill -9) rewrites the same bytes.
- `finalize(out)` lists the units' folder once, reads their files ahead in threads (`_read_ahead`:
  on S3 each is a request's latency), streams the units' rows into chips.parquet in row groups of CHIPS_ROW_GROUP rows
  and accumulates the sums chip by chip in store order (so neither depends on how the chips were
  cut into units, and no chip record is held whole), writes the arrays' statistics and the group
  attributes last, consolidates the metadata and removes `_build/`.

A local store is built in `<out>.partial/` and appears by rename; its build state is removed only
after that rename (`_clean_up`, the plan last), so a run stopped at any point of finalize is
finished by the next run, never rebuilt: before the rename it redoes finalize in `<out>.partial/`,
after it it removes what is left (the replaced store, `_build/`); no `.partial` survives. An s3://
store is written in place (prefix), readers see it finished when the group attributes (`chips`)
are there.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from sarflow import __version__
from sarflow.data import paths
from sarflow.data.catalog import LoadedCatalog
from sarflow.data.chipstore import CHIPS_TABLE, check_source_names, write_georeference
from sarflow.data.grid import SPLIT_LABELS, block_split
from sarflow.data.ingest import Ingested, gdal_env, ingest, valid_mask
from sarflow.data.shards import ShardWriter
from sarflow.data.storage import is_s3, s3_storage_options
from sarflow.errors import InputError

log = logging.getLogger("sarflow.data.tile")

BUILD = "_build"
MANIFEST = "manifest.json"
UNIT_MEMORY = 256 << 20  # bytes of chips a unit holds at most when its size is automatic
KILL_AT = "SARFLOW_TEST_KILL_AT"  # test hook (tests/test_tile.py): SIGKILL this process at that point of finalize


def _kill_point(name: str) -> None:
    """Test hook: a process whose $SARFLOW_TEST_KILL_AT is `name` kills itself here (kill -9 at a
    precise point of finalize: before-rename, replacing, after-rename, mid-cleanup)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- where the store is built

class Location:
    """A store's URI (local folder or s3://bucket/prefix) and where it is built: `<out>.partial`
    locally (renamed into place by finalize), the prefix itself on S3. `placed`: a local store
    renamed into place by a finalize that was stopped before it removed its build state (`_build/`
    is still in it, no `.partial` beside it): the build is there, only the clean-up is left."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        self.s3 = is_s3(uri)
        self.uri = uri.rstrip("/") if self.s3 else str(Path(uri).resolve())
        self.partial = None if self.s3 else self.uri + ".partial"
        self.placed = not self.s3 and not Path(self.partial).exists() and Path(self.uri, BUILD).is_dir()
        self.work = self.uri if self.s3 or self.placed else self.partial
        if self.s3:
            import s3fs

            self.fs = s3fs.S3FileSystem(**s3_storage_options())
            self.root = self.work[len("s3://"):]
        else:
            from fsspec.implementations.local import LocalFileSystem

            self.fs = LocalFileSystem()
            self.root = self.work

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.key(*parts))

    def read(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.key(*parts))

    def write(self, data: bytes, *parts: str) -> None:
        """Whole or not at all: one PUT on S3, a temporary file renamed locally."""
        path = self.key(*parts)
        if self.s3:
            self.fs.pipe_file(path, data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # two writers of one key never share it
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)

    def names(self, *parts: str):
        """The names of the files in a folder of the build, streamed (a folder of a continental build
        holds millions: neither fsspec's listing cache nor one list holds them all); none if it is not there."""
        path = self.key(*parts)
        if not self.s3:
            try:
                with os.scandir(path) as entries:
                    yield from (e.name for e in entries)
            except FileNotFoundError:
                return
            return
        from sarflow.data.storage import explain_s3_error, minio_client, s3_settings, split_s3

        settings = s3_settings()
        bucket, prefix = split_s3("s3://" + path + "/")
        try:
            for obj in minio_client(settings).list_objects(bucket, prefix=prefix, recursive=False):
                yield obj.object_name[len(prefix):]
        except Exception as e:  # noqa: BLE001 - every failure becomes one error naming the folder
            raise explain_s3_error(f"s3://{bucket}/{prefix}", e, settings) from None

    def remove(self, *parts: str) -> None:
        path = self.key(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear_store(self) -> None:
        """Removes everything of the store but its build state (zarr's mode "w" would remove that too)."""
        if not self.fs.exists(self.root):
            return
        for entry in self.fs.ls(self.root, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1] != BUILD:
                self.fs.rm(entry, recursive=True)

    def finished(self) -> bool:
        """A finished store is at the URI (locally: the folder; on S3: group attributes with `chips`)."""
        if not self.s3:
            return Path(self.uri).exists() and not self.placed
        try:
            meta = json.loads(self.read("zarr.json"))
        except (FileNotFoundError, OSError, ValueError):
            return False
        return "chips" in meta.get("attributes", {}) and not self.exists(BUILD, "plan.json")

    def zarr_store(self):
        if self.s3:
            return zarr.storage.FsspecStore.from_url(self.work, storage_options=s3_storage_options(), read_only=False)
        return zarr.storage.LocalStore(self.work)


# ---------------------------------------------------------------- one build of a store at a time

_HELD: dict[tuple[str, int], tuple[int, int]] = {}  # (lock file, thread) held -> (fd, depth): tile() holds it across plan


class build_lock:  # noqa: N801 - used as a context manager, like a function
    """One build of a store at a time. A local output is locked by an exclusive flock on `<out>.lock`
    beside it (holder's pid and host written in it; the kernel drops the lock when the holder dies,
    kill -9 included, so a dead run never blocks the next; the file is removed on release). A second
    run on the same output is refused at once, naming the holder. Re-entrant within a thread (another
    thread of the same process is refused like another process).

    s3:// outputs are not locked: S3 has no lock that dies with its holder, so two concurrent builds
    of one s3:// prefix are the operator's to avoid (one `tile` per prefix; the distributed steps
    `tile-unit` share a plan by design)."""

    def __init__(self, out: str | Path):
        uri = str(out)
        self.path = None if is_s3(uri) else str(Path(uri).resolve()) + ".lock"
        self.uri = uri if is_s3(uri) else str(Path(uri).resolve())
        self.held = (self.path, threading.get_ident())  # re-entrant in one thread; another thread is another run

    def __enter__(self):
        if self.path is None:
            return self
        if self.held in _HELD:
            fd, depth = _HELD[self.held]
            _HELD[self.held] = (fd, depth + 1)
            return self
        import fcntl
        import socket

        paths.check_output_folder(Path(self.uri).parent, self.uri,
                            "choose another --out or make that folder writable, then rerun")
        parent = Path(self.uri).parent
        self.made = [p for p in [parent, *parent.parents] if not p.exists()]  # removed on release when left empty
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
                finally:
                    os.close(fd)
                raise InputError(self.uri, f"another tile run is building {self.uri} ({holder}, lock {self.path}); "
                                           "wait for it to finish, or stop it and rerun (a stopped run's lock is "
                                           "released with it; the rerun resumes its build)") from None
            try:  # a releasing holder may have removed the file between our open and flock: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        _HELD[self.held] = (fd, 1)
        return self

    def __exit__(self, *exc):
        if self.path is None:
            return False
        fd, depth = _HELD[self.held]
        if depth > 1:
            _HELD[self.held] = (fd, depth - 1)
            return False
        del _HELD[self.held]
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it retries on the new file
        except FileNotFoundError:
            pass
        os.close(fd)
        for folder in getattr(self, "made", []):  # folders this run made for its output, if it wrote nothing there
            try:
                folder.rmdir()
            except OSError:
                break
        return False


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    uri: str
    fingerprint: str
    total: int  # chips in the store
    shard_chips: int
    block_chips: int  # chips per side of a block (store order and warp window)
    workers: int
    units: list[list[int]]  # [first chip, end chip) of each unit: whole shards
    split: dict  # the split's summary for the group attributes

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def load(cls, loc: Location) -> "Plan":
        try:
            return cls(**json.loads(loc.read(BUILD, "plan.json")))
        except FileNotFoundError:
            raise InputError(loc.uri, "no tiling plan at this store (run `sarflow tile-plan CATALOG --out "
                             f"{loc.uri}` first, or the store is already finalized)") from None


SURVEY = "survey.json"
CHECKSUMS = "checksums"  # _build/checksums/*.json: [uri, size, stamp, sha256] rows of input checksums
SURVEY_CHECKSUMS = "survey.json"  # the survey's own record, in place of the parts'
SCREENED = "screen"  # _build/screen/<survey>-NNNNNN.npy: a screened part's candidate chips, kept or not


@dataclass
class Survey:
    """The plan's first step: the inputs' fingerprint, the blocks' side and the blocks cut into
    screening parts ([first block, end block) each, in the grid's block order)."""
    fingerprint: str
    block_chips: int
    parts: list[list[int]]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def part_file(self, part: int) -> str:
        """A screened part's file, named by this survey (its inputs and its cut): a part a task of
        another survey of the store writes late (a cancelled run's pod) is never taken for this one's."""
        cut = hashlib.sha256(json.dumps(self.parts).encode()).hexdigest()[:8]
        return f"{self.fingerprint[:16]}-{cut}-{part:06d}.npy"

    @classmethod
    def load(cls, loc: Location) -> "Survey":
        try:
            return cls(**json.loads(loc.read(BUILD, SURVEY)))
        except FileNotFoundError:
            raise InputError(loc.uri, "no survey at this store (run `sarflow tile-plan CATALOG --out "
                             f"{loc.uri} --survey N` first, or the store is already finalized)") from None


def screen_cut(sizes: list[int], parts: int, rows: list[int] | None = None) -> list[list[int]]:
    """Blocks of `sizes` candidate chips cut into up to `parts` parts of consecutive blocks with about as
    many candidate chips each, none empty ([first block, end block) each). With `rows` (each block's
    row of blocks, in order) and at least as many rows as parts, parts are whole rows: a part reads
    the sources' rows of its own blocks, not the tail of one row and the head of the next (two rows at
    full width)."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, not {parts}")
    if rows is not None:
        starts = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]]
        if len(starts) >= parts:
            bounds = starts + [len(sizes)]
            by_row = screen_cut([sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])], parts)
            return [[bounds[a], bounds[b]] for a, b in by_row]
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    edges = [0] + [int(np.searchsorted(ends, total * i / parts, side="left")) + 1 for i in range(1, parts)] + [len(sizes)]
    edges = sorted(set(min(e, len(sizes)) for e in edges))
    return [[a, b] for a, b in zip(edges, edges[1:])] or [[0, 0]]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def block_side(grid, options) -> int:
    """Chips per side of a block: the store-order unit and the warp window. `block_chips`, or (0)
    about `window_px` pixels whatever the chip size. A pixel's value can depend on the window GDAL
    warps it in, so windows are always whole blocks, whichever unit renders them."""
    return options.block_chips or max(1, round(options.window_px / grid.stride))


class _Handover:
    """Warped layers of the blocks the plan had to warp (chips the source pixels did not settle),
    handed to the units that run in the same process (`tile()`), which would warp those blocks
    again: up to UNIT_MEMORY bytes, each taken once; keyed by plan fingerprint, block, source."""

    def __init__(self):
        self.layers: dict[tuple, np.ndarray] = {}
        self.lock = threading.Lock()

    def offer(self, key: tuple, layer: np.ndarray) -> None:
        with self.lock:
            if sum(x.nbytes for x in self.layers.values()) + layer.nbytes <= UNIT_MEMORY:
                self.layers[key] = layer

    def take(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            return self.layers.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self.layers.clear()


HANDOVER = _Handover()


def kept_chips(renderer, ing: Ingested, blocks, resampling: dict, workers: int, screen: bool = True,
               hand_over: str | None = None, first: int = 0) -> list[np.ndarray]:
    """Per block, for each of its candidate chips: a valid pixel (in every band) of every required
    source once warped? Decided from the source pixels where they settle it (data/screen.py), by
    warping the block as the units will otherwise (every chip when `screen` is False: the reference).
    With `hand_over` (the plan's fingerprint) the layers warped here are offered to this process's
    units (HANDOVER), keyed by block number: `blocks` are the grid's blocks from number `first` on."""
    from sarflow.data.screen import INVALID, UNKNOWN, VALID, screen_sources
    from sarflow.data.tile import _ordered

    required = [s for s in ing.sources if s.spec.required]
    sizes = [len(b.chips) for b in blocks]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    positions = np.concatenate([b.chips for b in blocks]) if blocks else np.empty((0, 2), np.int64)
    if not required:
        return [np.ones(n, dtype=bool) for n in sizes]
    if screen:
        status = screen_sources(ing, required, resampling, positions, workers)
    else:
        status = np.full((len(required), len(positions)), UNKNOWN, dtype=np.int8)
    kept = (status == VALID).all(axis=0)
    undecided = ~kept & ~(status == INVALID).any(axis=0)

    def check(bi):  # the undecided chips of a block, from the block warped as a unit warps it
        block, lo = blocks[bi], starts[bi]
        sel = undecided[lo:lo + sizes[bi]]
        out = np.ones(int(sel.sum()), dtype=bool)
        layers = {}
        for i, s in enumerate(required):
            if (status[i, lo:lo + sizes[bi]][sel] == UNKNOWN).any():
                layers[s.name] = renderer.warp(s, block)
                got = renderer.chips(s, layers[s.name], block, block.chips[sel])
                out &= valid_mask(got, s.fill_value).all(axis=1).any(axis=(1, 2))
        if hand_over and (out.any() or kept[lo:lo + sizes[bi]].any()):  # a unit will warp this block
            for name, layer in layers.items():
                HANDOVER.offer((hand_over, first + bi, name), layer)
        return bi, sel, out

    todo = [bi for bi in range(len(blocks)) if undecided[starts[bi]:starts[bi] + sizes[bi]].any()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for bi, sel, out in _ordered(pool, check, todo, inflight=workers + 1):
            part = kept[starts[bi]:starts[bi] + sizes[bi]]
            part[sel] = out
    log.info("%d candidate chips: %d decided from the source pixels, %d by warping %d of %d blocks",
             len(positions), len(positions) - int(undecided.sum()), int(undecided.sum()), len(todo), len(blocks))
    return [kept[starts[bi]:starts[bi] + sizes[bi]] for bi in range(len(blocks))]


def unit_chips(options, ing: Ingested) -> int:
    """Chips per unit: `unit_shards` whole shards, or (0) as many as fit UNIT_MEMORY, at least one shard."""
    S = options.shard_chips
    if options.unit_shards:
        return options.unit_shards * S
    g = ing.grid
    chip_bytes = sum(len(s.spec.bands) * np.dtype(s.dtype).itemsize
                     * (g.chip_size // s.spec.store_factor(g.resolution)) ** 2
                     for s in ing.sources)
    block = block_side(ing.grid, options) ** 2  # at least 4 blocks a unit: a block cut by a unit edge is warped twice
    return max(1, UNIT_MEMORY // (chip_bytes * S), -(-4 * block // S)) * S


def plan(catalog: LoadedCatalog, out: str | Path, options, hand_over: bool = False) -> Plan:
    """Step 1: the grid, every chip's index, the arrays and the work units (see the module docstring):
    `survey`, every part screened in this process (but those other processes screened), `commit_plan`.
    Reuses a complete plan of the same inputs and options (a resumed build keeps its written units),
    or their survey and its screened parts. Holds the output's build lock (`build_lock`): a second run
    on the same output is refused. `hand_over`: this process runs the units next (tile()), so the
    blocks the plan warps are kept for them (HANDOVER)."""
    with build_lock(out):
        _, state = _survey(catalog, out, options, None)
        return _commit(out, hand_over, state)


def survey(catalog: LoadedCatalog, out: str | Path, options, parts: int) -> Survey:
    """Step 1a: ingests the catalog (checksums included) and cuts the grid's blocks into up to `parts`
    screening parts, each screened by `screen_part` in any process, then `commit_plan`. A survey of the
    same inputs, options and parts is reused with the parts already screened; a complete plan of the
    same inputs is kept (nothing is left to screen)."""
    with build_lock(out):
        return _survey(catalog, out, options, parts)[0]


def _survey(catalog: LoadedCatalog, out: str | Path, options, parts: int | None) -> tuple[Survey, dict | None]:
    """The survey, and the ingested state it holds (None when the plan is complete), which `plan()`
    hands to `_commit` rather than reading it back. `parts` None: reuse a survey of the same inputs
    whatever its parts (else one part)."""
    from sarflow.data.tile import _fingerprint, choose_resampling, plan_blocks

    loc = Location(out)
    if not loc.s3 and not Path(loc.uri).exists() and _replaced(loc).is_dir():
        # an --overwrite killed between moving the old store aside and the rename: the old store goes
        # back first, so only another --overwrite replaces it (the same inputs then resume that build)
        os.replace(_replaced(loc), loc.uri)
        log.info("%s: put back the store an interrupted --overwrite had moved aside", loc.uri)
        loc = Location(out)
    _refuse_finished(loc, options.overwrite)
    known = _recorded_checksums(loc) if options.checksum else {}
    ing = ingest(catalog, checksum=options.checksum, known=known)  # a bad source file is named first
    check_source_names([s.name for s in ing.sources], str(ing.catalog.path))
    fingerprint = _fingerprint(ing, options)
    planned, surveyed = _same(loc, Plan, "plan.json", fingerprint), _same(loc, Survey, SURVEY, fingerprint)
    if planned is not None:
        log.info("resuming %s: %d units planned", loc.work, len(planned.units))
        _record_checksums(loc, ing)
        # nothing to screen: one no-op part
        return surveyed or Survey(fingerprint, planned.block_chips, [[0, 0]]), None
    side = block_side(ing.grid, options)
    blocks = plan_blocks(ing.grid, side)
    if surveyed is not None and (parts is None or surveyed.parts == _cut(blocks, side, parts)):
        done = sum(loc.exists(BUILD, SCREENED, surveyed.part_file(i)) for i in range(len(surveyed.parts)))
        log.info("resuming %s: surveyed, %d of %d parts screened", loc.work, done, len(surveyed.parts))
        _record_checksums(loc, ing)
        state = pickle.loads(loc.read(BUILD, "ingested.pkl"))
        if state["options"] != options:  # options outside the fingerprint (unit size, threads) are this run's
            state["options"] = options
            loc.write(pickle.dumps(state), BUILD, "ingested.pkl")
        return surveyed, state
    if surveyed is not None:
        log.info("cutting the survey of %s into %d parts again: its screened parts are dropped", loc.work, parts)
    elif (loc.exists(BUILD, "plan.json") or loc.exists(BUILD, SURVEY)) and not loc.placed:
        log.info("discarding %s: it was built from other inputs or options", loc.work)
    if loc.placed:  # a finished store (of other inputs or options) whose finalize stopped before its clean-up
        _clean_up(loc)
        if not options.overwrite:
            raise InputError(loc.uri, "the store already exists (use --overwrite to replace it)")
        loc = Location(out)
    loc.remove()
    with gdal_env([u for s in ing.sources for u in s.files]):
        resampling = {(s.name, u): choose_resampling(s, f, ing.grid) for s in ing.sources for u, f in s.files.items()}
    state = {"ing": ing, "resampling": resampling, "options": options}
    _record_checksums(loc, ing)
    loc.write(pickle.dumps(state), BUILD, "ingested.pkl")
    loc.write(json.dumps(ing.manifest(), indent=1, sort_keys=True).encode(), BUILD, MANIFEST)
    result = Survey(fingerprint, side, _cut(blocks, side, parts or 1))
    loc.write(result.to_json(), BUILD, SURVEY)  # last: the survey is complete
    log.info("surveyed %s: %d candidate chips in %d blocks, %d screening parts", loc.uri, len(ing.grid.candidates),
             len(blocks), len(result.parts))
    return result, state


def checksum_part(catalog: LoadedCatalog, out: str | Path, part: int, parts: int, overwrite: bool = False,
                  workers: int | None = None) -> int | None:
    """Step 0 at scale, before `survey`: hashes part `part` of `parts` of the catalog's input files (the
    parts cut by bytes, `checksum_shares`) and records their checksums with their stamps in the build
    (`_build/checksums/`), whole or not at all. The survey then reads only the files no part hashed, or
    that changed since. A file recorded already with its current stamp is not read again. `workers`:
    hashing threads (default: up to 8). Returns how many files this part hashed; None when the part holds
    no file (more parts than files)."""
    from sarflow.data.ingest import catalog_files, input_stamps, recorded_or_hashed

    loc = Location(out)
    if not 0 <= part < parts:
        raise InputError(loc.uri, f"checksum part {part} of {parts} does not exist (parts are numbered from 0 "
                                  "to parts - 1)")
    _refuse_finished(loc, overwrite)
    every = input_stamps(catalog_files(catalog))  # one listing per S3 folder: sizes and stamps
    mine = checksum_shares({uri: size for uri, (size, _) in every.items()}, parts)[part]
    if not mine:
        return None
    stamps = {uri: every[uri] for uri in mine}
    digests, hashed = recorded_or_hashed(stamps, _recorded_checksums(loc), workers)
    _refuse_finished(Location(out), overwrite)  # finished while this part hashed: it writes nothing there
    _write_checksums(loc, f"part-{part:06d}-of-{parts:06d}.json", stamps, digests)
    log.info("checksum part %d of %d: %d files hashed (%d bytes), %d recorded already", part, parts, hashed,
             sum(stamps[u][0] for u in mine), len(stamps) - hashed)
    return hashed


def checksum_shares(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """The input files cut into `parts` shares of about as many bytes each, the same in every process
    that sees the same sizes: largest file first, each to the share with the fewest bytes so far (the
    fewest files, then the lowest-numbered, on a tie). A 10 GB scene and a thousand 1 MB labels end up in different shares, where
    cutting by count would give one part most of the bytes. Should two processes see different sizes (a
    file rewritten between them), a file may be hashed by two parts or by none: the survey hashes
    whatever no record covers."""
    shares, load = [[] for _ in range(parts)], [(0, 0, i) for i in range(parts)]
    for uri in sorted(sizes, key=lambda u: (-sizes[u], u)):
        total, count, i = heapq.heappop(load)  # fewest bytes, then fewest files (empty files spread too)
        shares[i].append(uri)
        heapq.heappush(load, (total + sizes[uri], count + 1, i))
    return [sorted(share) for share in shares]


def _refuse_finished(loc: Location, overwrite: bool) -> None:
    if loc.finished() and not overwrite:
        raise InputError(loc.uri, "the store already exists (use --overwrite to replace it)")


def _write_checksums(loc: Location, name: str, stamps: dict, digests: dict) -> None:
    """A checksum record (`_build/checksums/<name>`): [uri, size, stamp, sha256] rows, whole or not at all."""
    rows = [[u, *stamps[u], digests[u]] for u in sorted(stamps)]
    loc.write(json.dumps(rows).encode(), BUILD, CHECKSUMS, name)


def _recorded_checksums(loc: Location) -> dict:
    """The input checksums recorded in the build: (uri, size, stamp) -> sha256 (`checksum_part`, and a
    survey's own). A record that cannot be read is skipped (the survey hashes that file itself)."""
    folder = loc.key(BUILD, CHECKSUMS)
    if not loc.fs.exists(folder):
        return {}
    known = {}
    for path in sorted(loc.fs.ls(folder, detail=False)):
        if not path.endswith(".json"):
            continue
        try:
            rows = json.loads(loc.fs.cat_file(path))
            found = {(u, int(size), stamp): sha for u, size, stamp, sha in rows
                     if isinstance(u, str) and isinstance(stamp, str) and re.fullmatch("[0-9a-f]{64}", str(sha))}
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s: not a checksum record (%s); skipped", path, e)
            continue
        if len(found) < len(rows):
            log.warning("%s: %d rows are not [uri, size, stamp, sha256]; skipped", path, len(rows) - len(found))
        known.update(found)
    return known


def _record_checksums(loc: Location, ing: Ingested) -> None:
    """Records the survey's input checksums (`_build/checksums/survey.json`) in place of the parts'
    records: a build resumed after its survey reads no input again, or only those that changed."""
    files = {u: f for s in ing.sources for u, f in s.files.items()}
    if not files or not all(f.sha256 for f in files.values()):
        return  # --no-checksum
    _write_checksums(loc, SURVEY_CHECKSUMS, {u: (f.size, f.stamp) for u, f in files.items()},
                     {u: f.sha256 for u, f in files.items()})
    for path in loc.fs.ls(loc.key(BUILD, CHECKSUMS), detail=False):
        if path.endswith(".json") and not path.endswith("/" + SURVEY_CHECKSUMS):
            loc.fs.rm(path)


def _same(loc: Location, kind, name: str, fingerprint: str):
    """The build's plan or survey (`kind`) when it is of these inputs and options, else None."""
    if not loc.exists(BUILD, name):
        return None
    try:
        found = kind.load(loc)
    except (ValueError, TypeError):
        return None
    return found if found.fingerprint == fingerprint else None


def _cut(blocks: list, side: int, parts: int) -> list[list[int]]:
    """The grid's `blocks` (of `side` chips) cut into screening parts of whole rows where they allow."""
    return screen_cut([len(b.chips) for b in blocks], parts, rows=[int(b.chips[0, 0]) // side for b in blocks])


def screen_part(out: str | Path, part: int, workers: int | None = None) -> int | None:
    """Step 1b: screens the blocks of one part of the survey (which of their candidate chips hold a
    valid pixel of every required source) and writes the result (`_build/screen/`, a file named by the
    survey and the part, whole or not at all). Returns the part's kept chips; None when there is nothing to do: the part is screened
    already, the plan is complete, or `part` is past the parts (more tasks than parts)."""
    loc = Location(out)
    if part < 0:
        raise InputError(loc.uri, f"screening part {part} does not exist (parts are numbered from 0)")
    if loc.exists(BUILD, "plan.json"):
        return None
    s = Survey.load(loc)
    if part >= len(s.parts) or loc.exists(BUILD, SCREENED, s.part_file(part)):
        return None
    return _screen(loc, s, part, workers)


def _screen(loc: Location, s: Survey, part: int, workers: int | None, hand_over: str | None = None,
            state: dict | None = None, blocks: list | None = None) -> int:
    """`state` (the survey's ingested state) and `blocks` (the grid's) when the caller has them already:
    a commit screening many parts reads and cuts them once."""
    from sarflow.data.tile import BlockRenderer, plan_blocks

    state = state or pickle.loads(loc.read(BUILD, "ingested.pkl"))
    ing, resampling = state["ing"], state["resampling"]
    a, b = s.parts[part]
    blocks = (blocks if blocks is not None else plan_blocks(ing.grid, s.block_chips))[a:b]
    renderer = BlockRenderer(ing, resampling)
    try:
        valid = kept_chips(renderer, ing, blocks, resampling, max(1, workers or state["options"].workers),
                           hand_over=hand_over, first=a)
    finally:
        renderer.close()
    kept = np.concatenate(valid) if valid else np.zeros(0, dtype=bool)
    loc.write(_npy(kept), BUILD, SCREENED, s.part_file(part))
    return int(kept.sum())


def commit_plan(out: str | Path) -> Plan:
    """Step 1c: screens the parts of the survey no process screened (in this process), then fixes every
    chip's index and split, creates the arrays and cuts the work units (`plan.json`, last). The plan of
    a store already planned is returned as it is."""
    with build_lock(out):
        return _commit(out, False)


def _commit(out: str | Path, hand_over: bool, state: dict | None = None) -> Plan:
    """`state`: the survey's ingested state when this process surveyed (else read from the build)."""
    from sarflow.data.tile import _create_arrays, plan_blocks

    loc = Location(out)
    if loc.exists(BUILD, "plan.json"):
        return Plan.load(loc)
    s = Survey.load(loc)
    state = state or pickle.loads(loc.read(BUILD, "ingested.pkl"))
    ing, resampling, options = state["ing"], state["resampling"], state["options"]
    grid = ing.grid
    blocks = plan_blocks(grid, s.block_chips)
    for i in range(len(s.parts)):
        if not loc.exists(BUILD, SCREENED, s.part_file(i)):
            _screen(loc, s, i, options.workers, hand_over=s.fingerprint if hand_over else None, state=state,
                    blocks=blocks)
    valid = []
    for i, (a, b) in enumerate(s.parts):
        try:
            kept_part = np.load(io.BytesIO(loc.read(BUILD, SCREENED, s.part_file(i))), allow_pickle=False)
        except ValueError as e:
            raise InputError(loc.uri, f"screened part {i} cannot be read ({e}): remove {BUILD}/{SCREENED}/"
                                      f"{s.part_file(i)} and screen it again") from None
        sizes = [len(blk.chips) for blk in blocks[a:b]]
        if kept_part.shape != (sum(sizes),):
            raise InputError(loc.uri, f"screened part {i} holds {kept_part.size} chips, its blocks {sum(sizes)}: "
                                      f"remove {BUILD}/{SCREENED}/{s.part_file(i)} and screen it again")
        valid += np.split(kept_part.astype(bool), np.cumsum(sizes)[:-1]) if sizes else []
    kept = np.concatenate([b.chips[ok] for b, ok in zip(blocks, valid)]).astype(np.int64)
    block_of = np.concatenate([np.full(int(ok.sum()), i, dtype=np.int64) for i, ok in enumerate(valid)])
    total = len(kept)
    if total == 0:
        raise InputError(str(ing.catalog.path), "no chip has a valid pixel in every required source")
    cand = grid.candidates
    split_of = block_split(grid, cand[:, 1], cand[:, 0], options.split_block, options.split_fractions)
    splits = np.array([SPLIT_LABELS.index(split_of[(iy, ix)]) for iy, ix in kept.tolist()], dtype=np.int8)
    step = unit_chips(options, ing)
    units = [[a, min(a + step, total)] for a in range(0, total, step)]

    loc.clear_store()  # arrays of a commit stopped before its plan was written
    root = zarr.open_group(loc.zarr_store(), mode="a", zarr_format=3)
    _create_arrays(root, ing, total, options, resampling)
    loc.write(_npy(np.column_stack([kept, splits.astype(np.int64), block_of])), BUILD, "chips.npy")
    result = Plan(uri=loc.uri, fingerprint=s.fingerprint, total=total, shard_chips=options.shard_chips,
                  block_chips=s.block_chips, workers=options.workers, units=units,
                  split={**split_of.summary(), "fractions": list(options.split_fractions)})
    loc.write(result.to_json(), BUILD, "plan.json")  # last: the plan is complete
    log.info("planned %s: %d chips in %d units of up to %d chips", loc.uri, total, len(units), step)
    return result


# ---------------------------------------------------------------- a unit

def _load_build(loc: Location) -> tuple[Plan, Ingested, dict, np.ndarray]:
    p = Plan.load(loc)
    state = pickle.loads(loc.read(BUILD, "ingested.pkl"))
    chips = np.load(io.BytesIO(loc.read(BUILD, "chips.npy")), allow_pickle=False)
    return p, state["ing"], state["resampling"], chips


def unit_done(out: str | Path, unit: int) -> bool:
    loc = Location(out)
    return loc.placed or loc.exists(BUILD, "units", f"{unit:06d}.json")  # placed: every unit is in the store


def write_unit(out: str | Path, unit: int, workers: int | None = None, force: bool = False,
               hand_on: bool = False, build: tuple | None = None) -> dict:
    """Step 2: warps and writes the unit's shards into the store, then its report (returned).
    A unit whose report exists is skipped unless `force`. `hand_on`: the next unit runs next in this
    process, so a block whose chips run on into it is handed to it warped (HANDOVER), not warped twice.
    `build`: the plan's state (`_load_build`) when the caller has read it already (a run of units reads
    it once: the chip table of a continental store is hundreds of MB)."""
    from sarflow.data.tile import BlockRenderer, _chips_table, _ordered, chip_contributions, plan_blocks, unit_statistics

    loc = Location(out)
    if loc.placed:
        raise InputError(loc.uri, "the store is already finalized, every unit is in it (`sarflow tile-finalize "
                                  f"{loc.uri}` finishes the clean-up its finalize was stopped in)")
    p, ing, resampling, table = build or _load_build(loc)
    if not 0 <= unit < len(p.units):
        raise InputError(loc.uri, f"unit {unit} does not exist (the plan has units 0..{len(p.units) - 1})")
    a, b = p.units[unit]
    if not force and unit_done(loc.uri, unit):
        for s in ing.sources:  # a block the previous unit handed on to this one (done meanwhile) is not kept
            HANDOVER.take((p.fingerprint, int(table[a, 3]), s.name))
        return json.loads(loc.read(BUILD, "units", f"{unit:06d}.json"))
    if force:  # its old report (and shard hashes) goes first
        loc.remove(BUILD, "units", f"{unit:06d}.json")
    workers = max(1, workers or p.workers)
    chips, splits, block_of = table[a:b, :2], table[a:b, 2], table[a:b, 3]
    g = ing.grid
    blocks = plan_blocks(g, p.block_chips)
    root = zarr.open_group(loc.zarr_store(), mode="r+", zarr_format=3)
    writers = {s.name: ShardWriter(root[s.name]) for s in ing.sources}
    chunks = {s.name: [None] * (b - a) for s in ing.sources}  # each chip's encoded chunk until its shard is written
    fractions = {s.name: np.zeros(b - a) for s in ing.sources}
    train = splits == SPLIT_LABELS.index("train")
    contributions = {s.name: [None] * (b - a) for s in ing.sources}  # train chips' statistics
    renderer = BlockRenderer(ing, resampling)
    S = p.shard_chips
    shards = list(range(a // S, -(-b // S)))  # whole shards, one writer each

    # the unit's last block when its chips run on into the next unit (units are whole shards, blocks are not)
    shared = int(block_of[-1]) if hand_on and b < len(table) and table[b, 3] == block_of[-1] else None

    def render(bi):  # the whole block (its window does not depend on the unit)
        block = blocks[bi]
        layers = {s.name: HANDOVER.take((p.fingerprint, bi, s.name)) for s in ing.sources}
        layers = {n: renderer.warp(s, block) if layers[n] is None else layers[n] for s in ing.sources for n in [s.name]}
        if bi == shared:
            for name, layer in layers.items():
                HANDOVER.offer((p.fingerprint, bi, name), layer)
        return bi, layers

    def cut(bi, layers):  # the unit's chips of a block: encoded, valid fractions, train statistics
        js = np.flatnonzero(block_of == bi)  # contiguous: the unit's chips are in block order
        lo, hi = int(js[0]), int(js[-1]) + 1
        tr = np.flatnonzero(train[lo:hi])
        for s in ing.sources:
            got = renderer.chips(s, layers[s.name], blocks[bi], chips[lo:hi])
            fractions[s.name][lo:hi] = valid_mask(got, s.fill_value).all(axis=1).mean(axis=(1, 2))
            chunks[s.name][lo:hi] = [writers[s.name].encode_chunk(c) for c in got]
            for j, c in zip(tr.tolist(), chip_contributions(s, got[tr])):
                contributions[s.name][lo + j] = _on_chip_grid(c, renderer.factor(s))
        return hi

    def refuse_empty(lo: int, hi: int) -> None:
        bad = [j for s in ing.sources if s.spec.required for j in np.flatnonzero(fractions[s.name][lo:hi] == 0).tolist()]
        if bad:
            j = lo + min(bad)
            raise InputError(loc.uri, f"unit {unit}: chip {g.chip_id(*chips[j][::-1].tolist())} has no valid pixel in "
                                      "a required source, unlike when it was planned (did an input change?)")

    written: dict[str, list] = {}  # shard file -> [size, sha256]
    try:
        # warping in `workers` threads; each block's chips are cut and encoded in `workers` other
        # threads as it arrives, and each shard written as soon as its chips are encoded
        with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=workers) as encoders:
            pending: deque = deque()
            left = deque(shards)

            def collect(limit: int) -> None:
                while len(pending) > limit:
                    filled = pending.popleft().result()
                    while left and (left[0] + 1) * S - a <= filled or (left and filled == b - a):
                        shard = left.popleft()
                        lo, hi = shard * S - a, min((shard + 1) * S, b) - a
                        refuse_empty(lo, hi)  # before its shard is written
                        for name, writer in writers.items():
                            file = writer.write_encoded(shard, chunks[name][lo:hi])
                            if file:
                                written[file[0]] = list(file[1:])
                            chunks[name][lo:hi] = [None] * (hi - lo)

            for bi, layers in _ordered(pool, render, list(dict.fromkeys(block_of.tolist())), inflight=workers + 1):
                pending.append(encoders.submit(cut, bi, layers))
                collect(workers)  # at most `workers` blocks wait to be cut: memory stays bounded
            collect(0)
    finally:
        renderer.close()
    # the unit's rows of chips.parquet (finalize streams them into one file: no chip record passes
    # through one process's memory)
    valid = {s.name: [round(float(v), 6) for v in fractions[s.name]] for s in ing.sources}
    rows = _chips_table(ing, chips[:, 1], chips[:, 0], splits, a, valid)
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="snappy")
    loc.write(buf.getvalue(), BUILD, "units", f"{unit:06d}.parquet")
    geo = json.loads(rows.schema.metadata[b"geo"])
    outlines = geo["columns"][geo["primary_column"]]  # what differs between the units' GeoParquet metadata
    # train statistics: per band the count, min, max or class counts of the unit's train chips, and each
    # train chip's sums (finalize accumulates those chip by chip in store order: the same float64 totals
    # however the chips were cut into units)
    parts, sums = {}, {}
    rows_of_train = np.flatnonzero(train).tolist()
    for i, s in enumerate(ing.sources):
        parts[s.name], chip_sums, chip_squares = unit_statistics(
            s.spec.kind, [contributions[s.name][j] for j in rows_of_train], len(s.spec.bands))
        if chip_sums is not None:
            sums[f"sum_{i}"], sums[f"sumsq_{i}"] = chip_sums, chip_squares
    buf = io.BytesIO()
    np.savez(buf, **sums)
    loc.write(buf.getvalue(), BUILD, "units", f"{unit:06d}.npz")
    # last, the report: the unit is done. "shards": path -> [size, sha256] of every shard file written,
    # which finalize's integrity record takes instead of reading the store back
    report = {"unit": unit, "chips": [a, b], "train_chips": len(rows_of_train), "shards": written,
              "stats": parts,
              "outlines": {k: outlines[k] for k in ("bbox", "geometry_types")}}
    loc.write(json.dumps(report).encode(), BUILD, "units", f"{unit:06d}.json")
    return report


def _on_chip_grid(contrib: list, k: int) -> list:
    """A chip's statistics contribution from a source stored at k times the pixel size, counted in
    chip-grid pixels as the reader returns them (each stored pixel is k*k of them): counts and sums
    times k*k, so means, deviations and class fractions are those of the stored pixels."""
    if k == 1:
        return contrib
    w = k * k
    out = []
    for c in contrib:
        if c is None:
            out.append(None)
        elif isinstance(c[0], list):  # categorical: [[code, count], ...]
            out.append([[code, n * w] for code, n in c])
        else:  # continuous: [count, sum, sumsq, min, max]
            n, total, sq, lo, hi = c
            out.append([n * w, total * w, sq * w, lo, hi])
    return out


# ---------------------------------------------------------------- finalize

def finalize(out: str | Path) -> str:
    """Step 3: chips.parquet, statistics and group attributes (last), consolidated metadata; renames
    a local build into place, then removes the build state (`_clean_up`). Returns the store's URI.
    A store already renamed into place (a finalize stopped after its rename) only gets the clean-up."""
    from sarflow.data.tile import Stats, _ordered

    loc = Location(out)
    if loc.placed:
        log.info("finishing %s: its finalize was stopped after the store was renamed into place", loc.uri)
        _clean_up(loc)
        return loc.uri
    p, ing, _, table = _load_build(loc)
    missing = _units_without_report(loc, len(p.units))
    if missing:
        raise InputError(loc.uri, f"{len(missing)} of {len(p.units)} units are not written yet (first: {missing[0]}); "
                                  f"run `sarflow tile-unit {loc.uri} --unit N` for them")

    def read(u):  # a unit's report and its train chips' sums
        report = _unit_file(loc, u, "json", lambda b: json.loads(b))
        if "outlines" not in report:
            raise InputError(loc.uri, f"unit {u} was written by an older sarflow (its report has another layout); "
                                      f"rewrite it: `sarflow tile-unit {loc.uri} --unit {u} --force`")
        return report, (_unit_file(loc, u, "npz", lambda b: dict(np.load(io.BytesIO(b)))) if report["train_chips"]
                        else {})

    stats, shard_files, outlines, ahead = Stats(ing.sources), {}, [], _read_ahead(p)
    with ThreadPoolExecutor(ahead) as pool:
        for report, sums in _ordered(pool, read, range(len(p.units)), inflight=ahead):
            shard_files.update(report["shards"])
            for i, s in enumerate(ing.sources):
                stats.merge_unit(s.name, report["stats"][s.name], sums.get(f"sum_{i}"), sums.get(f"sumsq_{i}"))
            outlines.append(report["outlines"])
    total = p.total
    assert len(table) == total, (len(table), total)
    counts = np.bincount(table[:, 2], minlength=len(SPLIT_LABELS))
    kept = {k: int(counts[i]) for i, k in enumerate(SPLIT_LABELS)}
    log.info("kept %d of %d candidate chips (%d dropped: no valid pixel in a required source: %s); kept per split: %s",
             total, len(ing.grid.candidates), len(ing.grid.candidates) - total,
             ", ".join(s.name for s in ing.sources if s.spec.required) or "none", kept)
    store = loc.zarr_store()
    root = zarr.open_group(store, mode="r+", zarr_format=3)
    for s in ing.sources:
        root[s.name].update_attributes({"stats": {"split": "train", "bands": stats.summary(s.name, list(s.spec.bands))}})
    _write_chips_table(loc, len(p.units), outlines, ahead)
    loc.write(loc.read(BUILD, MANIFEST), MANIFEST)
    g = ing.grid
    # what xarray reads in place: spatial_ref, chip_x/chip_y (not modalities: readers take those from the attributes)
    x0, y0 = g.origin  # the chips' west and north edges as chip_bounds gives them (16 bytes a chip)
    write_georeference(root, x0 + table[:, 1] * g.step, y0 - table[:, 0] * g.step, g.crs, g.resolution, g.chip_size,
                       [s.name for s in ing.sources])
    from sarflow.data.integrity import record

    _drop_interrupted_writes(loc)
    # every shard (size and SHA-256 as the units wrote them: the store is not read back), the coordinate
    # arrays and the chip table, before the attributes
    record(loc.work, known=shard_files)
    # last, in one write (attrs.update would write zarr.json once a key: a request each on S3): a reader
    # of s3:// sees the store finished when `chips` is there
    root.update_attributes({
        "crs": g.crs.to_string(),
        "crs_wkt": g.crs.to_wkt(),
        "resolution": g.resolution,
        "chip_size": g.chip_size,
        "overlap": g.overlap,
        "origin": list(g.origin),
        "grid_key": g.key,
        "catalog_hash": ing.catalog.catalog.hash(),
        "sarflow_version": __version__,
        "modalities": [s.name for s in ing.sources],
        "inputs": [s.name for s in ing.sources if s.spec.effective_role == "input"],
        "labels": [s.name for s in ing.sources if s.spec.effective_role == "label"],
        "chips": total,
        "chips_table": CHIPS_TABLE,
        # the chunks' codec, as the arrays record it (tile.codec / tile.clevel)
        "compression": {k: v for k, v in root[ing.sources[0].name].compressors[0].to_dict()["configuration"].items()
                        if k in ("cname", "clevel")} | {"codec": "blosc"},
        "split": {**p.split, "chips": kept},
        # the windows GDAL warped in: blocks of this many chips a side, aligned on the grid, spanning
        # the candidate chips in them (a pixel's value can depend on its window; data/tile.py)
        "warp_block_chips": p.block_chips,
    })
    with warnings.catch_warnings():  # zarr notes consolidated metadata is not in the v3 spec yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)
    _kill_point("before-rename")
    if loc.s3:
        loc.remove(BUILD)
    else:  # the store appears whole by rename, its build state still in it: removed only after that
        out_path, trash = Path(loc.uri), _replaced(loc)
        if out_path.exists():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(out_path, trash)
            _kill_point("replacing")
        os.replace(loc.work, out_path)
        _kill_point("after-rename")
        _clean_up(Location(out_path))
    log.info("wrote %d chips to %s", total, loc.uri)
    return loc.uri


UNIT_READ_AHEAD = 16  # unit files finalize reads ahead at most (on S3 each costs a request's latency, not CPU;
                      # up to s3fs's pool of 10 connections at once) ...


def _read_ahead(p: Plan) -> int:
    """... and no more units than hold about a row group of chips.parquet (CHIPS_ROW_GROUP rows): units
    of thousands of small chips are read one or a few at a time, so the rows held do not grow with
    the units' size; units of a few large chips (M3LEO's 20) 16 at a time."""
    per_unit = max(1, p.total // max(1, len(p.units)))
    return max(1, min(UNIT_READ_AHEAD, CHIPS_ROW_GROUP // per_unit))


def _units_without_report(loc: Location, units: int) -> list[int]:
    """The units (of 0..units-1) whose report is not in the build, from one listing of the units'
    folder (not a request per unit: a continental build has hundreds of thousands)."""
    done = np.zeros(units, dtype=bool)
    for name in loc.names(BUILD, "units"):
        found = re.fullmatch(r"([0-9]{6,})\.json", name)  # not a writer's temporary file, nor the .npz/.parquet
        if found and int(found[1]) < units:
            done[int(found[1])] = True
    return np.flatnonzero(~done).tolist()


def units_not_done(out: str | Path, units: int) -> list[int]:
    """The units of the plan (0..units-1) whose report is not written yet, from one listing (a placed
    store has every unit in it)."""
    loc = Location(out)
    return [] if loc.placed else _units_without_report(loc, units)


def _unit_file(loc: Location, unit: int, ext: str, parse):
    """A unit's file in the build, parsed; one missing or unreadable (a partial copy of `_build/`, a
    corrupt object) is an InputError naming it and the command that writes it again."""
    name = f"{unit:06d}.{ext}"
    try:
        return parse(loc.read(BUILD, "units", name))
    except Exception as e:  # noqa: BLE001 - every failure of one file becomes one clear error
        raise InputError(loc.key(BUILD, "units", name), f"unit {unit}'s {ext} cannot be read ({type(e).__name__}: "
                                                         f"{e}); rewrite it: `sarflow tile-unit {loc.uri} --unit "
                                                         f"{unit} --force`") from None


CHIPS_ROW_GROUP = 16_384  # rows of chips.parquet per row group (about 8 MB), whatever the units: the same bytes


def _write_chips_table(loc: Location, units: int, outlines: list[dict], ahead: int) -> None:
    """chips.parquet from the units' rows, streamed in unit order into row groups of CHIPS_ROW_GROUP rows
    (in memory: the rows of the `ahead` units read ahead and a row group, not the table), its GeoParquet metadata the first unit's with
    the union of the units' bounding boxes and geometry types (`outlines`, from their reports). Written
    to a temporary file, then moved (local) or uploaded (S3) into place whole."""
    import tempfile

    import pyarrow as pa

    from sarflow.data.tile import _ordered

    boxes = np.array([o["bbox"] for o in outlines], dtype=np.float64)
    union = {"bbox": [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()],
             "geometry_types": sorted({t for o in outlines for t in o["geometry_types"]})}
    tmp = Path(tempfile.mkdtemp(prefix="sarflow-chips-", dir=None if loc.s3 else loc.key(BUILD)))
    path = tmp / CHIPS_TABLE
    try:
        def read(u):
            return _unit_file(loc, u, "parquet", lambda b: pq.ParquetFile(io.BytesIO(b)).read())

        writer, pending, held = None, [], 0
        with ThreadPoolExecutor(ahead) as pool:
            for u, part in enumerate(_ordered(pool, read, range(units), inflight=ahead)):
                if writer is None:
                    meta = json.loads(part.schema.metadata[b"geo"])
                    meta["columns"][meta["primary_column"]].update(union)
                    schema = part.schema.with_metadata({**part.schema.metadata, b"geo": json.dumps(meta).encode()})
                    writer = pq.ParquetWriter(path, schema, compression="snappy")
                pending.append(part.replace_schema_metadata(schema.metadata))
                held += part.num_rows
                while held >= CHIPS_ROW_GROUP or (u == units - 1 and held):
                    rows = pa.concat_tables(pending)  # views of the parts' columns: nothing copied
                    group = rows.slice(0, min(held, CHIPS_ROW_GROUP)).combine_chunks()  # one row group, contiguous
                    writer.write_table(group, row_group_size=CHIPS_ROW_GROUP)
                    pending, held = [rows.slice(group.num_rows)], held - group.num_rows
                    del rows, group
                    pa.default_memory_pool().release_unused()  # mimalloc keeps freed pages: the peak grew with the groups
        writer.close()
        if loc.s3:
            loc.fs.put_file(str(path), loc.key(CHIPS_TABLE))
        else:
            os.replace(path, loc.key(CHIPS_TABLE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_interrupted_writes(loc: Location) -> None:
    """zarr writes a local file to `<key>.<uuid>.partial` and renames it into place: a unit killed
    mid-write leaves that temporary file beside the shard its rerun rewrote whole. Every unit is done
    when finalize runs, so none is being written: they go. (An s3:// put is atomic: nothing is left.)"""
    if loc.s3:
        return
    for leftover in Path(loc.work).rglob("*.partial"):
        if leftover.is_file():
            leftover.unlink()


def _replaced(loc: Location) -> Path:
    """Where finalize moves the store it replaces (--overwrite) until the new one is in place."""
    return Path(loc.uri + ".replaced")


def _clean_up(loc: Location) -> None:
    """The last step of a local finalize, once the store is in place: removes the store it replaced
    and the build state, the plan last (a clean-up stopped half-way still finds the plan, so the next
    run of the same inputs resumes as this finalize and succeeds)."""
    shutil.rmtree(_replaced(loc), ignore_errors=True)
    build = Path(loc.uri, BUILD)
    if not build.is_dir():
        return
    for p in sorted(build.iterdir()):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != "plan.json":
            p.unlink()
    _kill_point("mid-cleanup")
    (build / "plan.json").unlink(missing_ok=True)
    build.rmdir()


def unit_runs(units: list[int], runs: int) -> list[list[int]]:
    """`units` cut into `runs` runs of consecutive items, as even as can be, none empty (at most one run
    per unit; no units give one empty run). A run goes to one process, which hands each block shared
    by two of its units on to the next one: only the blocks at the edges of runs are warped twice, not
    those at every unit's edge."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    runs = min(runs, len(units)) or 1
    edges = [len(units) * i // runs for i in range(runs + 1)]
    return [units[edges[i]:edges[i + 1]] for i in range(runs)]


def run_of(out: str | Path, runs: int, run: int) -> list[int]:
    """The units of run `run` of `runs` (`unit_runs` over every unit of the plan): what `sarflow
    tile-unit --runs R` and a pipeline's unit task write. A run past the units (more runs than units)
    has none."""
    if runs < 1 or not 0 <= run < runs:
        raise InputError(str(out), f"run {run} does not exist (runs 0..{runs - 1})")
    cut = unit_runs(list(range(len(Plan.load(Location(out)).units))), runs)
    return cut[run] if run < len(cut) else []


RUNS_PER_POD = 4  # runs per pod slot of an Indexed Job: a pod that finishes early takes another run


def job_runs(units: int, parallelism: int) -> int:
    """How many runs an Indexed Job of `parallelism` pods at once cuts `units` into: RUNS_PER_POD a pod
    slot (balance), at most one a unit."""
    return max(1, min(units, RUNS_PER_POD * max(1, parallelism)))


def run_units(out: str | Path, units: list[int] | None = None, processes: int = 1, workers: int | None = None,
              on_done=None, force: bool = False) -> list[int]:
    """Writes the given units (default: every unit not done yet, from one listing of the units' folder,
    or with `force` every unit) and returns those it wrote. A given unit whose report exists is left
    out unless `force`, by its own check: a pod given a run of a few units does not list a folder of
    hundreds of thousands. With `processes` > 1, in as many separate processes, each given one run of
    consecutive units (`unit_runs`) and being the one writer of their shards. `on_done(unit)` is called
    as each finishes (with processes, when its run finishes). Within a process a block shared with the
    next unit, run next, is warped once."""
    if units is None:
        n = len(Plan.load(Location(out)).units)
        todo = list(range(n)) if force else units_not_done(out, n)
    else:
        todo = [u for u in units if force or not unit_done(out, u)]
    if processes <= 1:
        return _write_run(str(out), todo, workers, force, on_done)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_write_run, str(out), run, workers, force) for run in unit_runs(todo, processes) if run]
        written = []
        for fut in as_completed(futures):
            for u in fut.result():
                written.append(u)
                if on_done:
                    on_done(u)
    return written


def _write_run(out: str, units: list[int], workers: int | None, force: bool, on_done=None) -> list[int]:
    """Writes `units` in this process in turn, the build state read once for all of them."""
    loc = Location(out)
    build = _load_build(loc) if units and not loc.placed else None  # a finished store: write_unit says so
    for i, u in enumerate(units):
        write_unit(out, u, workers=workers, force=force, hand_on=i + 1 < len(units) and units[i + 1] == u + 1,
                   build=build)
        if on_done:
            on_done(u)
    return units


# ---------------------------------------------------------------- beyond a ParallelFor: an Indexed Job

def indexed_job_manifest(store_uri: str, runs: int, image: str, parallelism: int = 16, name: str = "",
                         namespace: str = "sarflow") -> dict:
    """A Kubernetes Indexed Job (batch/v1) with one completion per run of consecutive units (`unit_runs`;
    `runs` = the number of units gives one per unit): each pod runs `sarflow tile-unit STORE --runs R`,
    which takes its run from $JOB_COMPLETION_INDEX. Keys from Secret `sarflow-s3`, endpoints from
    ConfigMap `sarflow-pipeline-env` (k8s/base); the pod label lets it reach MinIO."""
    import hashlib

    name = name or "sarflow-tile-" + hashlib.sha256(store_uri.encode()).hexdigest()[:10]
    labels = {"app.kubernetes.io/name": "sarflow-tile-unit", "sarflow.io/pipeline": "true"}
    container = {
        "name": "tile-unit",
        "image": image,
        "command": ["sarflow", "tile-unit", store_uri, "--runs", str(runs)],
        "envFrom": [{"configMapRef": {"name": "sarflow-pipeline-env"}}],
        "env": [{"name": k, "valueFrom": {"secretKeyRef": {"name": "sarflow-s3", "key": k}}}
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")],
        "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        # the restricted Pod Security profile namespace sarflow enforces, with a read-only root: HOME
        # and /tmp (GDAL's and Python's scratch) on an emptyDir
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    container["env"].append({"name": "HOME", "value": "/tmp"})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": runs,
            "parallelism": min(parallelism, runs),
            "backoffLimitPerIndex": 3,  # a failed run is retried on its own (its written units are skipped)
            "maxFailedIndexes": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels},
                         "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                                  "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                                      "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                                  "volumes": [{"name": "tmp", "emptyDir": {}}], "containers": [container]}},
        },
    }


def run_indexed_job(store_uri: str, runs: int, image: str, parallelism: int = 16, namespace: str | None = None,
                    timeout_s: int = 86400, poll_s: float = 10.0, api=None) -> None:
    """Creates the Indexed Job (in-cluster config, else ~/.kube/config) and waits for it to succeed.

    The job's name follows the store (one build per store: two jobs writing one store's shards
    would break the one-writer-per-shard rule); a job of that name left by an earlier run is
    adopted while it runs, else replaced (`sarflow.cluster.launch_and_wait`; units already written
    are skipped by `sarflow tile-unit`, so a rerun only does what is left). `api`: a BatchV1Api."""
    from kubernetes.client.rest import ApiException

    from sarflow.cluster import ABSENT, conditions_state, current_namespace, kube_api, launch_and_wait

    api = api or kube_api("BatchV1Api")
    ns = namespace or current_namespace()
    manifest = indexed_job_manifest(store_uri, runs, image, parallelism, namespace=ns)
    name = manifest["metadata"]["name"]

    def state() -> str:
        try:
            job = api.read_namespaced_job_status(name, ns)
        except ApiException as e:
            if e.status == 404:
                return ABSENT
            raise
        # an adopted job (an earlier launch) may be cut into other runs: done when its own completions are
        total = getattr(job.spec, "completions", None) or runs
        return conditions_state(job.status.conditions, done=(job.status.succeeded or 0) >= total)

    launch_and_wait(f"job {ns}/{name}", lambda: api.create_namespaced_job(ns, manifest), state,
                    lambda: api.delete_namespaced_job(name, ns, propagation_policy="Foreground"),
                    timeout_s, poll_s, failed_hint=f" (`kubectl -n {ns} logs job/{name}`)")

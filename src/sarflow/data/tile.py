"""Align + tile: every source reprojected onto the chip grid and written as a sharded Zarr v3
chip store (the contract in DESIGN.md).

How it runs:
- candidate chips (those touching the AOI) are grouped in square blocks of `block_chips`;
  worker threads warp one block window per source with GDAL (reads only the source window
  it needs, releases the GIL), so peak memory depends on the block, not the scene;
- the main thread takes blocks in order, drops chips without any valid pixel in a required
  source, and appends the rest to shard buffers; a full shard is written in one go by this
  single writer (zarr corrupts concurrent partial-shard writes);
- everything is built in `<out>.partial/`; after each shard a checkpoint records how far the
  run got, so a killed run resumes where it stopped; the finished store appears by rename.
Chip order, split and statistics depend only on the inputs and the options, so the same
inputs give byte-identical arrays however the run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
import zarr
from pydantic import field_validator
from pydantic.dataclasses import dataclass as config_dataclass
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from sarflow import __version__
from sarflow.data.catalog import LoadedCatalog
from sarflow.data.chipstore import CHIPS_TABLE
from sarflow.errors import InputError
from sarflow.data.grid import SPLIT_LABELS, ChipGrid, block_split, transform_geometry
from sarflow.data.ingest import WGS84, Ingested, RasterFile, Source, gdal_env, ingest, valid_mask
from sarflow.params import STAGE_CONFIG
from sarflow.progress import progress_bar

log = logging.getLogger(__name__)

PROGRESS_DIR = "_sarflow_progress"
MANIFEST = "manifest.json"
GDAL_CACHE_MB = 64  # GDAL's block cache; its default (5% of RAM) would dominate peak memory


def _grid_raster(grid: ChipGrid) -> tuple[int, int, int, int]:
    """(iy0, ix0, height, width): the raster of the grid that spans every candidate chip."""
    cand = grid.candidates
    iy0, ix0 = int(cand[:, 0].min()), int(cand[:, 1].min())
    rows, cols = int(cand[:, 0].max()) - iy0 + 1, int(cand[:, 1].max()) - ix0 + 1
    return iy0, ix0, grid.window_pixels(rows), grid.window_pixels(cols)


@config_dataclass(frozen=True, config=STAGE_CONFIG)
class TileOptions:
    """params.yaml's `tile:` section (`overwrite` and `checksum` are the command's flags)."""

    workers: int = 2
    shard_chips: int = 64
    block_chips: int = 4
    split_block: int | Literal["auto"] = 0  # chips per side of a split block; 0 (or "auto"): sized from the AOI
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    clevel: int = 3
    overwrite: bool = False
    checksum: bool = True

    @field_validator("split_block")
    @classmethod
    def _check_split_block(cls, v):
        if v != "auto" and v < 0:
            raise ValueError(f"split_block must be 'auto', 0 (auto) or a positive number of chips, not {v}")
        return v

    @field_validator("split_fractions")
    @classmethod
    def _check_split_fractions(cls, v):
        if any(f < 0 for f in v) or sum(v) <= 0:
            raise ValueError(f"split_fractions (train, val, test) must be non-negative with a positive sum, not {list(v)}")
        return v

    def fingerprint_fields(self) -> dict:
        return {
            "shard_chips": self.shard_chips,
            "block_chips": self.block_chips,
            "split_block": self.split_block or "auto",
            "split_fractions": list(self.split_fractions),
            "clevel": self.clevel,
        }


# ---------------------------------------------------------------- resampling

def resolution_in_grid(f: RasterFile, grid: ChipGrid) -> float:
    """The file's pixel size expressed in grid units (geometric mean of x and y)."""
    with rasterio.open(f.path) as ds:
        tr, _, _ = calculate_default_transform(ds.crs, grid.crs, ds.width, ds.height, *ds.bounds)
    return math.sqrt(abs(tr.a * tr.e))


def choose_resampling(source: Source, f: RasterFile, grid: ChipGrid) -> str:
    """The declared method, else by kind: downsampling averages (continuous) or takes the mode
    (categorical); same size or upsampling is bilinear (continuous) or nearest (categorical)."""
    if source.spec.resampling:
        return source.spec.resampling
    downsampling = resolution_in_grid(f, grid) < grid.resolution * 0.99
    if source.spec.kind == "categorical":
        return "mode" if downsampling else "nearest"
    return "average" if downsampling else "bilinear"


LINEAR_POWER = "linear_power"


def resampling_domain(source: Source) -> str:
    """Where a source's values are resampled: dB is logarithmic, so averaging or interpolating it
    directly would take a geometric mean of power (biased low under speckle); dB sources are
    resampled in linear power (10**(dB/10)) and converted back (multilooking). Others as they are."""
    return LINEAR_POWER if source.spec.units.lower() == "db" else "native"


def _linear_power_vrt(ds, src_nodata) -> str:
    """A GDAL VRT (XML) of `ds` in linear power: every band is 10**(dB/10) (the dB2pow pixel
    function, in float64); nodata pixels become NaN. Streams block by block like the file."""
    from xml.sax.saxutils import escape

    nodata = "" if src_nodata is None or math.isnan(src_nodata) else f"<NODATA>{src_nodata!r}</NODATA>"
    bands = "".join(
        f'<VRTRasterBand dataType="Float64" band="{b}" subClass="VRTDerivedRasterBand">'
        "<NoDataValue>nan</NoDataValue><PixelFunctionType>dB2pow</PixelFunctionType>"
        f'<ComplexSource><SourceFilename relativeToVRT="0">{escape(ds.name)}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand>{nodata}</ComplexSource></VRTRasterBand>"
        for b in range(1, ds.count + 1)
    )
    return (f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}"><SRS>{escape(ds.crs.to_wkt())}</SRS>'
            f"<GeoTransform>{', '.join(repr(v) for v in ds.transform.to_gdal())}</GeoTransform>{bands}</VRTDataset>")


def _power_to_db(power: np.ndarray, source: Source) -> np.ndarray:
    """Linear power (float64, NaN = nodata) back to dB in the store's dtype and fill value."""
    valid = ~np.isnan(power)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(power)
    dtype = np.dtype(source.dtype)
    if dtype.kind != "f":
        db = np.rint(db)
    return np.where(valid, db, source.fill_value).astype(dtype)


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class Block:
    iy0: int
    ix0: int
    rows: int  # chips along y
    cols: int  # chips along x
    chips: np.ndarray  # (k, 2) iy, ix of candidate chips in the block, in store order


def plan_blocks(grid: ChipGrid, block: int) -> list[Block]:
    cand = grid.candidates
    if len(cand) == 0:
        return []
    key_y, key_x = np.floor_divide(cand[:, 0], block), np.floor_divide(cand[:, 1], block)
    order = np.lexsort((cand[:, 1], cand[:, 0], key_x, key_y))
    cand, key_y, key_x = cand[order], key_y[order], key_x[order]
    bounds = np.flatnonzero(np.diff(key_y * 1_000_003 + key_x)) + 1
    out = []
    for part in np.split(cand, bounds):
        iy0, ix0 = part[:, 0].min(), part[:, 1].min()
        out.append(Block(int(iy0), int(ix0), int(part[:, 0].max() - iy0 + 1), int(part[:, 1].max() - ix0 + 1), part))
    return out


# ---------------------------------------------------------------- warping

class _Readers(threading.local):
    def __init__(self):
        self.vrts: dict[tuple[str, str], WarpedVRT] = {}
        self.env = None


class BlockRenderer:
    """Warps every source onto one block window.

    Each input file is seen through a GDAL WarpedVRT that spans the whole chip grid, and a
    block is a window read from it. The VRT warps in its own fixed blocks, so a pixel's value
    does not depend on how we cut the work (per-call reprojection of a small window would:
    GDAL's approximate transformer and averaging footprints follow the chunk). Each worker
    thread keeps its own datasets and VRTs open."""

    def __init__(self, ing: Ingested, resampling: dict[tuple[str, str], str]):
        self.ing = ing
        self.grid = ing.grid
        self.resampling = resampling
        self._local = _Readers()
        self._all: list = []
        self._lock = threading.Lock()
        self._uris = [u for s in ing.sources for u in s.files]
        self.iy0, self.ix0, self.height, self.width = _grid_raster(ing.grid)

    def _vrt(self, source: Source, f: RasterFile) -> WarpedVRT:
        loc = self._local
        if loc.env is None:
            loc.env = gdal_env(self._uris, GDAL_CACHEMAX=GDAL_CACHE_MB)
            loc.env.__enter__()
        key = (source.name, f.uri)
        vrt = loc.vrts.get(key)
        if vrt is None:
            try:
                ds = rasterio.open(f.path)
            except RasterioError as e:
                raise InputError(f.uri, f"cannot be opened any more ({e})") from None
            src_nodata = source.nodata
            if src_nodata is None and np.dtype(source.dtype).kind == "f":
                src_nodata = float("nan")
            nodata, dtype, opened = source.fill_value, source.dtype, [ds]
            if resampling_domain(source) == LINEAR_POWER:  # warp power; `warp` converts back to dB
                ds = rasterio.open(_linear_power_vrt(ds, src_nodata))
                opened.append(ds)
                src_nodata = nodata = float("nan")
                dtype = "float64"
            vrt = WarpedVRT(
                ds,
                crs=self.grid.crs,
                transform=self.grid.chip_transform(self.ix0, self.iy0),
                width=self.width,
                height=self.height,
                resampling=Resampling[self.resampling[key]],
                src_nodata=src_nodata,
                nodata=nodata,
                dtype=dtype,
            )
            loc.vrts[key] = vrt
            with self._lock:
                self._all.extend([vrt, *reversed(opened)])
        return vrt

    def close(self):
        with self._lock:
            for obj in self._all:
                obj.close()
            self._all.clear()

    def warp(self, source: Source, block: Block) -> np.ndarray:
        """The source on the block window; files of a mosaic are laid in order, later ones win."""
        g = self.grid
        height, width = g.window_pixels(block.rows), g.window_pixels(block.cols)
        window = Window((block.ix0 - self.ix0) * g.stride, (block.iy0 - self.iy0) * g.stride, width, height)
        fill = source.fill_value
        dst = np.full((len(source.spec.bands), height, width), fill, dtype=source.dtype)
        for item in source.items:
            for uri, bands in item:
                vrt = self._vrt(source, source.files[uri])
                try:
                    data = vrt.read(list(range(1, len(bands) + 1)), window=window)
                except RasterioError as e:
                    raise InputError(uri, f"cannot read pixels while warping, the file is truncated or corrupt ({e})") from None
                if resampling_domain(source) == LINEAR_POWER:
                    data = _power_to_db(data, source)
                if len(item) == 1 and len(source.items) == 1:
                    return data
                ok = valid_mask(data, fill)
                target = dst[bands]
                np.copyto(target, data, where=ok)
                dst[bands] = target
        return dst

    def render(self, block: Block):
        """Chips of a block that have data in every required source, in store order."""
        g = self.grid
        layers = {s.name: self.warp(s, block) for s in self.ing.sources}
        kept = []
        for iy, ix in block.chips.tolist():
            r0, c0 = (iy - block.iy0) * g.stride, (ix - block.ix0) * g.stride
            chips, fractions = {}, {}
            for s in self.ing.sources:
                chip = layers[s.name][:, r0:r0 + g.chip_size, c0:c0 + g.chip_size]
                chips[s.name] = chip
                fractions[s.name] = float(valid_mask(chip, s.fill_value).all(axis=0).mean())
            if all(fractions[s.name] > 0 for s in self.ing.sources if s.spec.required):
                kept.append((iy, ix, chips, fractions))
        return kept


def _ordered(pool: ThreadPoolExecutor, fn, items, inflight: int):
    """Like pool.map, but keeps at most `inflight` items queued so memory stays bounded."""
    queue: deque = deque()
    it = iter(items)
    for item in it:
        queue.append(pool.submit(fn, item))
        if len(queue) >= inflight:
            break
    while queue:
        fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(fn, nxt))
        yield fut.result()


# ---------------------------------------------------------------- statistics

class Stats:
    """Per-band statistics over the valid pixels of train chips (float64 sums, exact to merge)."""

    def __init__(self, sources: list[Source], state: dict | None = None):
        self.kinds = {s.name: s.spec.kind for s in sources}
        self.fill = {s.name: s.fill_value for s in sources}
        self.acc = state or {}
        for s in sources:
            nb = len(s.spec.bands)
            if s.name not in self.acc:
                if s.spec.kind == "continuous":
                    self.acc[s.name] = {"count": [0] * nb, "sum": [0.0] * nb, "sumsq": [0.0] * nb,
                                        "min": [None] * nb, "max": [None] * nb}
                else:
                    self.acc[s.name] = {"classes": [{} for _ in range(nb)]}

    def add(self, name: str, chip: np.ndarray):
        a = self.acc[name]
        valid = valid_mask(chip, self.fill[name])
        for b in range(chip.shape[0]):
            v = chip[b][valid[b]]
            if v.size == 0:
                continue
            if self.kinds[name] == "continuous":
                v = v.astype(np.float64)
                a["count"][b] += int(v.size)
                a["sum"][b] += float(v.sum())
                a["sumsq"][b] += float(np.square(v).sum())  # not np.dot: BLAS threads would fight the warpers
                lo, hi = float(v.min()), float(v.max())
                a["min"][b] = lo if a["min"][b] is None else min(a["min"][b], lo)
                a["max"][b] = hi if a["max"][b] is None else max(a["max"][b], hi)
            else:
                codes, counts = np.unique(v, return_counts=True)
                hist = a["classes"][b]
                for c, n in zip(codes.tolist(), counts.tolist()):
                    hist[str(c)] = hist.get(str(c), 0) + n

    def summary(self, name: str, bands: list[str]) -> dict:
        a = self.acc[name]
        out = {}
        for b, band in enumerate(bands):
            if self.kinds[name] == "continuous":
                n = a["count"][b]
                mean = a["sum"][b] / n if n else None
                var = max(a["sumsq"][b] / n - mean * mean, 0.0) if n else None
                out[band] = {"count": n, "mean": mean, "std": math.sqrt(var) if n else None,
                             "min": a["min"][b], "max": a["max"][b]}
            else:
                hist = a["classes"][b]
                total = sum(hist.values())
                out[band] = {"count": total,
                             "class_fractions": {k: hist[k] / total for k in sorted(hist, key=int)} if total else {}}
        return out


# ---------------------------------------------------------------- the store

def _fingerprint(ing: Ingested, options: TileOptions) -> str:
    payload = {
        "catalog": ing.catalog.catalog.hash(),
        "grid": ing.grid.key,
        "options": options.fingerprint_fields(),
        "resampling_domains": {s.name: resampling_domain(s) for s in ing.sources},
        "inputs": sorted((ing.catalog.relative(u), f.sha256, f.size) for s in ing.sources for u, f in s.files.items()),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _create_arrays(root: zarr.Group, ing: Ingested, n_max: int, options: TileOptions, resampling) -> None:
    size = ing.grid.chip_size
    for s in ing.sources:
        nb = len(s.spec.bands)
        dtype = np.dtype(s.dtype)
        root.create_array(
            s.name,
            shape=(n_max, nb, size, size),
            chunks=(1, nb, size, size),
            shards=(options.shard_chips, nb, size, size),
            dtype=dtype,
            fill_value=s.fill_value,
            compressors=zarr.codecs.BloscCodec(
                cname="zstd", clevel=options.clevel, shuffle="bitshuffle" if dtype.itemsize == 1 else "shuffle"
            ),
            dimension_names=("chip", f"{s.name}_band", "y", "x"),
            attributes={
                "bands": list(s.spec.bands),
                "units": s.spec.units,
                "kind": s.spec.kind,
                "nodata": None if s.nodata is None or np.dtype(s.dtype).kind == "f" else s.nodata,
                "nodata_in_store": "NaN" if dtype.kind == "f" else s.nodata,
                "resampling": {ing.catalog.relative(u): resampling[(s.name, u)] for u in s.files},
                "resampling_domain": resampling_domain(s),
                "date": s.spec.date.isoformat() if s.spec.date else None,
                "required": s.spec.required,
                "role": s.spec.effective_role,
                "legend": s.spec.legend,
                "classes": s.spec.class_table(),
                "range": list(s.spec.range) if s.spec.range is not None else None,
                "sources": [{"uri": ing.catalog.relative(u), "sha256": f.sha256, "size": f.size}
                            for u, f in s.files.items()],
            },
        )


class _Progress:
    """The checkpoint inside `<out>.partial/`: state.json plus one record file per committed shard."""

    def __init__(self, partial: Path):
        self.dir = partial / PROGRESS_DIR
        self.state_path = self.dir / "state.json"

    def load(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def save_records(self, shard: int, records: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"records-{shard:06d}.tmp"
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self.dir / f"records-{shard:06d}.json")

    def records(self, shards: int) -> list[dict]:
        out = []
        for k in range(shards):
            out.extend(json.loads((self.dir / f"records-{k:06d}.json").read_text()))
        return out


def _chips_table(ing: Ingested, records: list[dict]):
    import geopandas as gpd
    import pandas as pd
    import shapely

    g = ing.grid
    df = pd.DataFrame.from_records(records)
    minx, miny, maxx, maxy = g.chip_bounds(df["ix"].to_numpy(), df["iy"].to_numpy())
    df.insert(1, "index", np.arange(len(df), dtype=np.int64))
    df["minx"], df["miny"], df["maxx"], df["maxy"] = minx, miny, maxx, maxy
    geoms = transform_geometry(shapely.box(minx, miny, maxx, maxy), g.crs, WGS84, densify=4)
    cols = ["chip_id", "index", "ix", "iy", "minx", "miny", "maxx", "maxy", "split"] + [
        c for c in df.columns if c.startswith("valid_")
    ]
    return gpd.GeoDataFrame(df[cols], geometry=geoms, crs="EPSG:4326")


def tile(catalog: LoadedCatalog, out: str | Path, options: TileOptions = TileOptions(), show_progress: bool = True) -> Path:
    """Builds the chip store at `out` from a catalog; returns its path. Resumes a killed run."""
    out = Path(out).resolve()
    if out.exists() and not options.overwrite:
        raise InputError(str(out), "the store already exists (use --overwrite to replace it)")
    partial = out.with_name(out.name + ".partial")
    try:
        ing = ingest(catalog, checksum=options.checksum)
        return _build(ing, out, partial, options, show_progress)
    except InputError:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _build(ing: Ingested, out: Path, partial: Path, options: TileOptions, show_progress: bool) -> Path:
    grid = ing.grid
    fingerprint = _fingerprint(ing, options)
    progress = _Progress(partial)
    state = progress.load() if partial.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        log.info("discarding %s: it was built from other inputs or options", partial)
        state = None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)

    with gdal_env([u for s in ing.sources for u in s.files]):
        resampling = {(s.name, u): choose_resampling(s, f, grid) for s in ing.sources for u, f in s.files.items()}
    blocks = plan_blocks(grid, options.block_chips)
    cand = grid.candidates
    split_of = block_split(grid, cand[:, 1], cand[:, 0], options.split_block, options.split_fractions)  # split_of[(iy, ix)]

    if state is None:
        root = zarr.open_group(str(partial), mode="w", zarr_format=3)
        _create_arrays(root, ing, len(cand), options, resampling)
        state = {"fingerprint": fingerprint, "shards": 0, "block": 0, "skip": 0, "stats": {}, "done": False}
        progress.save(state)
    else:
        root = zarr.open_group(str(partial), mode="r+", zarr_format=3)
        log.info("resuming %s at block %d/%d (%d shards written)", partial, state["block"], len(blocks), state["shards"])
    state["split"] = {**split_of.summary(), "fractions": list(options.split_fractions)}  # for the group attributes

    stats = Stats(ing.sources, state["stats"])
    S = options.shard_chips
    arrays = {s.name: root[s.name] for s in ing.sources}
    buffers = {s.name: np.empty((S,) + arrays[s.name].shape[1:], dtype=arrays[s.name].dtype) for s in ing.sources}
    pending: list[dict] = []
    n_written = state["shards"] * S
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal n_written
        k = len(pending)
        if k == 0:
            return
        for name, arr in arrays.items():
            arr[n_written:n_written + k] = buffers[name][:k]
        progress.save_records(n_written // S, pending)
        n_written += k
        pending.clear()

    if not state["done"]:
        renderer = BlockRenderer(ing, resampling)
        start = state["block"]
        try:
            with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool, progress_bar(
                "tile", total=len(blocks), completed=start, enabled=show_progress
            ) as bar:
                results = _ordered(pool, renderer.render, blocks[start:], inflight=options.workers + 1)
                for bi, kept in enumerate(results, start=start):
                    skip = state["skip"] if bi == start else 0
                    for j in range(skip, len(kept)):
                        iy, ix, chips, fractions = kept[j]
                        slot = len(pending)
                        split = split_of[(iy, ix)]
                        for name, chip in chips.items():
                            buffers[name][slot] = chip
                            if split == "train":
                                stats.add(name, chip)
                        pending.append({"chip_id": grid.chip_id(ix, iy), "ix": ix, "iy": iy, "split": split,
                                        **{f"valid_{n}": round(v, 6) for n, v in fractions.items()}})
                        if len(pending) == S:
                            flush()
                            last = j + 1 == len(kept)
                            state.update(shards=n_written // S, block=bi + 1 if last else bi,
                                         skip=0 if last else j + 1, stats=stats.acc)
                            progress.save(state)
                    bar.advance(1, chips=n_written + len(pending))
        finally:
            renderer.close()
        flush()
        state.update(done=True, total=n_written, stats=stats.acc)
        progress.save(state)
    elapsed = time.perf_counter() - t0
    return _finalize(ing, out, partial, progress, state, stats, arrays, elapsed)


def _finalize(ing, out: Path, partial: Path, progress: _Progress, state: dict, stats: Stats, arrays, elapsed: float) -> Path:
    total = state["total"]
    if total == 0:
        raise InputError(str(ing.catalog.path), "no chip has a valid pixel in every required source")
    records = progress.records(math.ceil(total / arrays[next(iter(arrays))].shards[0]))
    assert len(records) == total, (len(records), total)
    kept = {k: sum(r["split"] == k for r in records) for k in SPLIT_LABELS}
    log.info("kept %d of %d candidate chips (%d dropped: no valid pixel in a required source: %s); kept per split: %s",
             total, len(ing.grid.candidates), len(ing.grid.candidates) - total,
             ", ".join(s.name for s in ing.sources if s.spec.required) or "none", kept)
    root = zarr.open_group(str(partial), mode="r+", zarr_format=3)
    for s in ing.sources:
        arr = arrays[s.name]
        arr.resize((total,) + arr.shape[1:])
        arr.attrs["stats"] = {"split": "train", "bands": stats.summary(s.name, list(s.spec.bands))}
    g = ing.grid
    root.attrs.update({
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
        "split": {**state.get("split", {}), "chips": kept},  # block side, buffer, counts (candidates, kept chips)
    })
    with warnings.catch_warnings():  # zarr notes consolidated metadata is not in the v3 spec yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(partial))
    table = _chips_table(ing, records)
    table.to_parquet(partial / CHIPS_TABLE, index=False)
    (partial / MANIFEST).write_text(json.dumps(ing.manifest(), indent=1, sort_keys=True))
    shutil.rmtree(partial / PROGRESS_DIR)
    if out.exists():
        trash = out.with_name(out.name + ".replaced")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(partial, out)
        shutil.rmtree(trash)
    else:
        os.replace(partial, out)
    log.info("wrote %d chips to %s in %.1fs (%.1f chips/s)", total, out, elapsed, total / max(elapsed, 1e-9))
    return out

"""Align + tile: every source reprojected onto the chip grid and written as a sharded Zarr v3
chip store (the contract in DESIGN.md).

How it runs (three steps, data/tile_units.py, so separate processes or pods can share the work):
- `plan` fixes every chip's index: candidate chips (those touching the AOI) in store order
  (square blocks of `block_chips`), kept when they have a valid pixel in every required source;
  it creates the arrays and cuts the chips into work units of whole shards (zarr corrupts
  concurrent partial-shard writes, so one writer per shard);
- each unit warps the whole blocks (windows of about `window_px` pixels) its chips fall in with GDAL (worker threads
  read only the source windows they need and release the GIL), writes its shards and a report;
- `finalize` merges the reports in order (chips.parquet, train statistics), writes the group
  attributes last and consolidates the metadata.
`tile()` is the one-process reference: plan -> every unit -> finalize. A local store is built in
`<out>.partial/` and appears by rename (its build state removed after); a killed run resumes at the
first unit without a report, or finishes the finalize it was in (no `.partial` survives the rerun).
Chip order, split and statistics depend only on the inputs and the options, so the same inputs
give byte-identical stores however the run was interrupted or cut into units.
One build of a local output at a time: a second `tile` on the same output is refused at once
(`tile_units.build_lock`, a lock file beside the output that dies with its holder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from affine import Affine
from pydantic import field_validator
from pydantic.dataclasses import dataclass as config_dataclass
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import calculate_default_transform, reproject

from sarflow import __version__
from sarflow.data.catalog import LoadedCatalog
from sarflow.data.chipstore import CHIPS_TABLE, coarse_dims
from sarflow.errors import InputError
from sarflow.data.grid import SPLIT_LABELS, ChipGrid, block_split, transform_geometry
from sarflow.data.ingest import WGS84, Ingested, RasterFile, Source, gdal_env, ingest, valid_mask
from sarflow.params import STAGE_CONFIG
from sarflow.progress import progress_bar

log = logging.getLogger(__name__)

# rasterio's reproject warns "Dataset has no geotransform ... identity matrix" at random while threads
# warp at once (odc-geo#131, geoutils#851: results unaffected). Here every input has a geotransform
# (ingest refuses one without), every destination is given one, and stores came out byte-identical in
# runs with and without the warning; every chip equals gdalwarp (tests/test_reference_gdalwarp.py).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.warp")


@config_dataclass(frozen=True, config=STAGE_CONFIG)
class TileOptions:
    """params.yaml's `tile:` section (`overwrite` and `checksum` are the command's flags)."""

    workers: int = 2
    shard_chips: int = 64
    block_chips: int = 0  # chips per side of a block (store order and warp window); 0: about window_px pixels
    split_block: int | Literal["auto"] = 0  # chips per side of a split block; 0 (or "auto"): sized from the AOI
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    codec: Literal["zstd", "lz4"] = "zstd"  # Blosc's inner codec: zstd (smaller) or lz4 (faster to write and read)
    clevel: int = 3
    window_px: int = 1024  # side of a block in pixels when block_chips is 0 (rounded to whole chips)
    unit_shards: int = 0  # shards per work unit; 0: as many as fit 256 MB of chips
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
            "block_chips": self.block_chips or f"auto:{self.window_px}px",
            "split_block": self.split_block or "auto",
            "split_fractions": list(self.split_fractions),
            "codec": self.codec,
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
    (categorical); same size or upsampling is bilinear (continuous) or nearest (categorical).
    Up or down is judged against the resolution the source is stored at (`store_resolution`)."""
    if source.spec.resampling:
        return source.spec.resampling
    downsampling = resolution_in_grid(f, grid) < grid.resolution * source.spec.store_factor(grid.resolution) * 0.99
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
    dtype = np.dtype(source.dtype)
    if dtype.kind == "f":  # in the store's precision, in place; NaN (nodata) stays NaN, the fill value
        db = power.astype(dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log10(db, out=db)
        db *= 10.0
        return db
    valid = ~np.isnan(power)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = np.rint(10.0 * np.log10(power))
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
        self.opened: dict[tuple[str, str], tuple] = {}
        self.env = None


class BlockRenderer:
    """Warps every source onto one block window (a source with a `store_resolution` onto the same
    window at k times the pixel size: chip corners fall on its pixel corners, k dividing the stride).

    Each block is warped on its own by GDAL's warper (rasterio's reproject) straight from the
    input files. A pixel's value can depend on the window it is warped in (GDAL's approximate
    transformer and averaging footprints follow the chunk), so the windows are the blocks, fixed by
    the grid and `block_chips` alone: whichever unit, process or run warps a block gets the same
    pixels. Each worker thread keeps its own datasets open. (A WarpedVRT over the whole grid read
    block by block gives the same kind of window-dependent pixels for 1.3-1.8x the CPU.)"""

    def __init__(self, ing: Ingested, resampling: dict[tuple[str, str], str]):
        self.ing = ing
        self.grid = ing.grid
        self.resampling = resampling
        self._local = _Readers()
        self._all: list = []
        self._lock = threading.Lock()
        self._uris = [u for s in ing.sources for u in s.files]

    def _open(self, source: Source, f: RasterFile) -> tuple:
        """(dataset, src_nodata, nodata, dtype) of a file for this thread: dB sources are read
        through a VRT in linear power (nodata NaN, float64; `warp` converts back to dB)."""
        loc = self._local
        if loc.env is None:
            loc.env = gdal_env(self._uris)
            loc.env.__enter__()
        key = (source.name, f.uri)
        got = loc.opened.get(key)
        if got is None:
            try:
                ds = rasterio.open(f.path)
            except RasterioError as e:
                raise InputError(f.uri, f"cannot be opened any more ({e})") from None
            src_nodata = source.nodata
            if src_nodata is None and np.dtype(source.dtype).kind == "f":
                src_nodata = float("nan")
            nodata, dtype, opened = source.fill_value, source.dtype, [ds]
            if resampling_domain(source) == LINEAR_POWER:
                ds = rasterio.open(_linear_power_vrt(ds, src_nodata))
                opened.append(ds)
                src_nodata = nodata = float("nan")
                dtype = "float64"
            got = loc.opened[key] = (ds, src_nodata, nodata, dtype)
            with self._lock:
                self._all.extend(reversed(opened))
        return got

    def factor(self, source: Source) -> int:
        """k: the source is warped and stored at k times the grid's pixel size."""
        return source.spec.store_factor(self.grid.resolution)

    def chips(self, source: Source, layer: np.ndarray, block: Block, positions: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        """The chips at `positions` ((n, 2) iy, ix, in the block) of a block's warped `layer` of `source`:
        (n, bands, chip/k, chip/k) cut from a strided view of every chip position of the block, in
        one fancy-indexing step, or chip by chip straight into `out` (no temporary copy)."""
        g, k = self.grid, self.factor(source)
        step, n = g.stride // k, g.chip_size // k
        bands, height, width = layer.shape
        sb, sy, sx = layer.strides
        every = np.lib.stride_tricks.as_strided(
            layer, shape=(block.rows, block.cols, bands, n, n), strides=(step * sy, step * sx, sb, sy, sx), writeable=False)
        rows, cols = positions[:, 0] - block.iy0, positions[:, 1] - block.ix0
        if out is None:
            return every[rows, cols]
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            out[i] = every[r, c]
        return out

    def close(self):
        with self._lock:
            for obj in self._all:
                obj.close()
            self._all.clear()

    def warp(self, source: Source, block: Block) -> np.ndarray:
        """The source on the block window; files of a mosaic are laid in order, later ones win."""
        g, k = self.grid, self.factor(source)
        height, width = g.window_pixels(block.rows) // k, g.window_pixels(block.cols) // k
        transform = g.chip_transform(block.ix0, block.iy0) @ Affine.scale(k)
        fill = source.fill_value
        dst = None
        for item in source.items:
            for uri, bands in item:
                ds, src_nodata, nodata, dtype = self._open(source, source.files[uri])
                data = np.empty((len(bands), height, width), dtype=dtype)
                try:
                    reproject(rasterio.band(ds, list(range(1, len(bands) + 1))), data, src_nodata=src_nodata,
                              dst_nodata=nodata, dst_transform=transform, dst_crs=g.crs,
                              resampling=Resampling[self.resampling[(source.name, uri)]], num_threads=1)
                except RasterioError as e:
                    raise InputError(uri, f"cannot read pixels while warping, the file is truncated or corrupt ({e})") from None
                if resampling_domain(source) == LINEAR_POWER:
                    data = _power_to_db(data, source)
                if len(item) == 1 and len(source.items) == 1:
                    return data
                if dst is None:
                    dst = np.full((len(source.spec.bands), height, width), fill, dtype=source.dtype)
                ok = valid_mask(data, fill)
                target = dst[bands]
                np.copyto(target, data, where=ok)
                dst[bands] = target
        return dst


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
        self.acc = state or {}
        for s in sources:
            nb = len(s.spec.bands)
            if s.name not in self.acc:
                if s.spec.kind == "continuous":
                    self.acc[s.name] = {"count": [0] * nb, "sum": [0.0] * nb, "sumsq": [0.0] * nb,
                                        "min": [None] * nb, "max": [None] * nb}
                else:
                    self.acc[s.name] = {"classes": [{} for _ in range(nb)]}

    def merge_unit(self, name: str, part: dict, sums: np.ndarray | None = None, sumsq: np.ndarray | None = None):
        """Adds one unit's train chips (`unit_statistics` makes both): `part` and, for continuous sources,
        each train chip's sums and sums of squares ((chips, bands) float64 in store order, 0.0 where a
        band had no valid pixel). The sums are accumulated chip by chip (np.add.accumulate is
        sequential), so the float64 totals are those of adding chip by chip in store order, however the
        chips were cut into units."""
        a = self.acc[name]
        if self.kinds[name] != "continuous":
            for hist, got in zip(a["classes"], part["classes"]):
                for code, n in got.items():
                    hist[code] = hist.get(code, 0) + n
            return
        for b in range(len(a["count"])):
            a["count"][b] += int(part["count"][b])
            for key, pick in (("min", min), ("max", max)):
                v = part[key][b]
                if v is not None:
                    a[key][b] = v if a[key][b] is None else pick(a[key][b], v)
            for key, values in (("sum", sums), ("sumsq", sumsq)):
                if values is not None and len(values):
                    a[key][b] = float(np.add.accumulate(np.concatenate(([a[key][b]], values[:, b])))[-1])

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


def unit_statistics(kind: str, per_chip: list, bands: int) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """A unit's train statistics of one source, in one pass over its train chips' contributions
    (`chip_contributions`, in store order): what its report holds (per band the pixel count, min and
    max, or the class counts: exact in any order) and, for a continuous source, each chip's per-band
    sum and sum of squares ((chips, bands) float64, 0.0 where the band had no valid pixel: adding 0.0
    leaves a running float64 sum as it was), which `Stats.merge_unit` accumulates in store order."""
    if kind != "continuous":
        classes = [{} for _ in range(bands)]
        for contrib in per_chip:
            for hist, c in zip(classes, contrib):
                for code, n in c or ():
                    hist[code] = hist.get(code, 0) + n
        return {"classes": classes}, None, None
    count, lo, hi = [0] * bands, [None] * bands, [None] * bands
    sums, squares = np.zeros((len(per_chip), bands)), np.zeros((len(per_chip), bands))
    for r, contrib in enumerate(per_chip):
        for b, c in enumerate(contrib):
            if c is not None:
                count[b] += c[0]
                sums[r, b], squares[r, b] = c[1], c[2]
                lo[b] = c[3] if lo[b] is None else min(lo[b], c[3])
                hi[b] = c[4] if hi[b] is None else max(hi[b], c[4])
    return {"count": count, "min": lo, "max": hi}, sums, squares


STATS_BATCH_PX = 1 << 18  # pixels per band reduced at once: float64 temporaries stay in cache


def chip_contributions(source: Source, chips: np.ndarray) -> list[list]:
    """Per chip of `source` ((n, bands, h, w)), per band: None (no valid pixel), [count, sum, sumsq, min, max]
    (continuous: float64 sums over the chip's pixels in row order, nodata counted as 0) or
    [[code, count], ...] (categorical, codes as strings in ascending order). A chip's contribution
    depends on that chip alone, however many are computed together. JSON round-trips it exactly."""
    kind, fill = source.spec.kind, source.fill_value
    n, nb = chips.shape[:2]
    step = max(1, STATS_BATCH_PX // max(1, chips.shape[2] * chips.shape[3]))
    out = []
    for lo in range(0, n, step):
        part = chips[lo:lo + step]
        m = len(part)
        valid = valid_mask(part, fill)
        rows = [[None] * nb for _ in range(m)]
        for b in range(nb):
            ok = valid[:, b].reshape(m, -1)
            x = part[:, b].reshape(m, -1)
            counts = ok.sum(axis=1)
            if kind == "continuous":
                whole = bool((counts == x.shape[1]).all())  # every pixel valid: no masking, the same values
                z = (x if whole else np.where(ok, x, 0)).astype(np.float64)
                sums = z.sum(axis=1)
                # squares in place, summed row by row (not np.dot, whose BLAS threads would fight the
                # warpers; not einsum, whose sums depend on the rows summed with them)
                sumsq = np.square(z, out=z).sum(axis=1)
                if whole:
                    lows, highs = x.min(axis=1), x.max(axis=1)
                else:
                    big = np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).max
                    small = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
                    lows, highs = np.where(ok, x, big).min(axis=1), np.where(ok, x, small).max(axis=1)
                for i in np.flatnonzero(counts).tolist():
                    rows[i][b] = [int(counts[i]), float(sums[i]), float(sumsq[i]), float(lows[i]), float(highs[i])]
            else:
                for i in np.flatnonzero(counts).tolist():
                    codes, hits = code_counts(x[i][ok[i]])
                    rows[i][b] = [[str(c), k] for c, k in zip(codes.tolist(), hits.tolist())]
        out += rows
    return out


def code_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct codes of a categorical chip in ascending order and how many pixels hold each, as
    np.unique(values, return_counts=True): for 8- and 16-bit integer codes (land cover, labels) by a
    histogram over the dtype's range, a single pass instead of a sort."""
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2 and values.size:
        low = int(np.iinfo(values.dtype).min)
        hist = np.bincount(values if low == 0 else values.astype(np.int32) - low)
        codes = np.flatnonzero(hist)
        return codes + low, hist[codes]
    return np.unique(values, return_counts=True)


# ---------------------------------------------------------------- the store

# what a build leaves in `_build/` for the next step: 3 = units write their rows of chips.parquet and
# their train chips' sums beside a report of counts and their outlines' bbox (2: the whole GeoParquet
# metadata in every report; 1: reports of chip records). A build of another format is not resumed: its
# plan is made again.
BUILD_FORMAT = 3


def _fingerprint(ing: Ingested, options: TileOptions) -> str:
    payload = {
        "catalog": ing.catalog.catalog.hash(),
        "grid": ing.grid.key,
        "options": options.fingerprint_fields(),
        "resampling_domains": {s.name: resampling_domain(s) for s in ing.sources},
        "inputs": sorted((ing.catalog.relative(u), f.sha256, f.size) for s in ing.sources for u, f in s.files.items()),
        "version": __version__,
        "build_format": BUILD_FORMAT,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _create_arrays(root: zarr.Group, ing: Ingested, n_max: int, options: TileOptions, resampling) -> None:
    g = ing.grid
    for s in ing.sources:
        nb = len(s.spec.bands)
        dtype = np.dtype(s.dtype)
        k = s.spec.store_factor(g.resolution)
        size = g.chip_size // k
        # a source stored coarser: its own y/x dimensions (and pixel-centre coordinates, chipstore.coarse_dims)
        coarse = {"store_resolution": g.resolution * k, "store_factor": k} if k > 1 else {}
        root.create_array(
            s.name,
            shape=(n_max, nb, size, size),
            chunks=(1, nb, size, size),
            shards=(options.shard_chips, nb, size, size),
            dtype=dtype,
            fill_value=s.fill_value,
            compressors=zarr.codecs.BloscCodec(
                cname=options.codec, clevel=options.clevel, shuffle="bitshuffle" if dtype.itemsize == 1 else "shuffle"
            ),
            dimension_names=("chip", f"{s.name}_band", *coarse_dims(k)),
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
                **coarse,
            },
        )


GEOMETRY_TYPES = ("Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon",
                  "GeometryCollection")  # shapely's type ids, as GeoParquet names them


def _chips_table(ing: Ingested, ix: np.ndarray, iy: np.ndarray, splits: np.ndarray, first: int, valid: dict):
    """Rows `first`.. of chips.parquet, an Arrow table with its GeoParquet metadata: chips (`ix`, `iy`,
    split codes in SPLIT_LABELS) in the arrays' row order and each source's valid fraction (`valid`:
    source -> array), their bounds in the grid's CRS and their outline in WGS84 (WKB). A row depends on
    its chip alone, so the rows of every unit make the table (finalize streams them). pyarrow and shapely
    alone: a unit runner does not import pandas."""
    import pyarrow as pa
    import shapely

    g = ing.grid
    ix, iy = np.asarray(ix, dtype=np.int64), np.asarray(iy, dtype=np.int64)
    minx, miny, maxx, maxy = (np.asarray(b, dtype=np.float64) for b in g.chip_bounds(ix, iy))
    outlines = transform_geometry(shapely.box(minx, miny, maxx, maxy), g.crs, WGS84, densify=4)
    columns = {
        "chip_id": _arrow_bytes([g.chip_id(x, y).encode() for x, y in zip(ix.tolist(), iy.tolist())], pa.string()),
        "index": _arrow_numbers(np.arange(first, first + len(ix), dtype=np.int64)),
        "ix": _arrow_numbers(ix), "iy": _arrow_numbers(iy), "minx": _arrow_numbers(minx),
        "miny": _arrow_numbers(miny), "maxx": _arrow_numbers(maxx), "maxy": _arrow_numbers(maxy),
        "split": _arrow_bytes([SPLIT_LABELS[k].encode() for k in np.asarray(splits, dtype=np.int64).tolist()],
                              pa.string()),
        **{f"valid_{name}": _arrow_numbers(np.asarray(v, dtype=np.float64)) for name, v in valid.items()},
        "geometry": _arrow_bytes(list(shapely.to_wkb(outlines)), pa.binary()),
    }
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "crs": WGS84.to_json_dict(),
                                    "geometry_types": [GEOMETRY_TYPES[t] for t in
                                                       np.unique(shapely.get_type_id(outlines)).tolist()],
                                    "bbox": shapely.total_bounds(outlines).tolist()}},
           "creator": {"library": "sarflow", "version": __version__}}
    table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    return table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})


# Arrow arrays from their buffers: pa.array() imports pandas (0.2-0.3 CPU s) in every unit process

def _arrow_numbers(values: np.ndarray):
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _arrow_bytes(items: list[bytes], kind):
    """A string or binary Arrow array (`kind`) of `items`: 32-bit offsets and the bytes end to end."""
    import pyarrow as pa

    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=len(items)), out=offsets[1:])
    return pa.Array.from_buffers(kind, len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])


def tile(catalog: LoadedCatalog, out: str | Path, options: TileOptions = TileOptions(),
         show_progress: bool = True) -> Path | str:
    """Builds the chip store at `out` (a folder, or s3://bucket/prefix) from a catalog: plan, every
    unit in this process, finalize. Returns the store's path (local) or URI. Resumes a killed run."""
    from sarflow.data.tile_units import build_lock

    with build_lock(out):  # a second run on the same output is refused at once (it would adopt this build)
        return _tile(catalog, out, options, show_progress)


def _tile(catalog: LoadedCatalog, out: str | Path, options: TileOptions, show_progress: bool) -> Path | str:
    from sarflow.data.tile_units import HANDOVER, Location, finalize, plan, run_units, units_not_done

    loc = Location(out)
    if loc.finished() and not options.overwrite:
        raise InputError(loc.uri, "the store already exists (use --overwrite to replace it)")
    t0 = time.perf_counter()
    previous = loc.s3 and loc.finished()  # an S3 store is built in place: an input error before the plan clears
    try:                                   # the prefix must not remove the finished store that is there
        p = plan(catalog, out, options, hand_over=True)
        previous = False
        todo = units_not_done(out, len(p.units))
        with progress_bar("tile", total=len(p.units), completed=len(p.units) - len(todo), enabled=show_progress,
                          unit="units") as bar:
            run_units(out, todo, workers=options.workers, on_done=lambda u: bar.advance(1, chips=p.units[u][1]))
        uri = finalize(out)
    except InputError:
        if loc.s3:
            if not previous:
                loc.remove()
        else:  # the build, never the store: a store renamed into place (`Location.placed`) is finished
            shutil.rmtree(loc.partial, ignore_errors=True)
        raise
    finally:
        HANDOVER.clear()
    elapsed = time.perf_counter() - t0
    log.info("tiled %d chips in %.1fs (%.1f chips/s)", p.total, elapsed, p.total / max(elapsed, 1e-9))
    return uri if loc.s3 else Path(uri)

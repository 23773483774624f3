"""Which candidate chips hold a valid pixel of each required source, decided from the source pixels
without warping them (the plan's screening step, tile_units.screen_part).

A chip is kept when, warped, it holds a pixel valid in every band of each required source. Warping
the required sources only to learn that costs about what warping them again in the units costs (a
quarter to a third of tiling's CPU on the benchmark scenes). Most chips are decided from the source
pixels alone, read once at their own resolution. Per required source and chip:

- VALID: one of the chip's sample pixels is surely valid once warped: every source pixel within
  reach of the resampling kernel around it (its radius grown by the downsampling factor, plus
  margins for GDAL's approximate transformer and the cells below) is valid in every band (not NaN,
  not the nodata value, not masked) and, for an integer nodata, on one side of it, so no convex
  kernel can produce the nodata value;
- INVALID: no source pixel within reach of the chip's footprint is valid in any band;
- UNKNOWN otherwise (a sliver of data along an edge, a non-convex kernel with an integer nodata):
  the plan warps the blocks holding such chips exactly as the units do and decides them from that.

Both tests err on the safe side: VALID and INVALID are only claimed where the warp cannot disagree;
the units check every kept chip again and refuse a unit whose chip has no valid pixel.

Validity is kept per cell of CELL x CELL source pixels ("every pixel good", "some pixel valid") as
summed-area tables, so memory is a few bytes per cell; the file is read in strips of rows.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from sarflow.data.ingest import Ingested, Source, gdal_env, valid_mask
from sarflow.data.tile import LINEAR_POWER, resampling_domain
from sarflow.errors import InputError

VALID, INVALID, UNKNOWN = 1, 0, -1
CELL = 8  # source pixels per side of a validity cell
SAMPLES = 8  # sample pixels per chip side (fewer when the chip has fewer pixels)
STRIP_BYTES = 64 << 20  # bytes of source pixels read at once
CHIP_BATCH = 20_000  # chips whose points are transformed at once
FAR = 2.0 ** 40  # source pixels: farther than this a point did not project (a singularity), not a pixel
# GDAL's kernels: radius in source pixels before downsampling widens it; those whose value is a
# convex combination (or a copy) of the source values they read, so integers on one side of the
# nodata value stay on that side
KERNEL_RADIUS = {"nearest": 0.5, "bilinear": 1.0, "cubic": 2.0, "cubic_spline": 2.0, "lanczos": 3.0}
CONVEX = {"nearest", "bilinear", "average", "mode", "min", "max", "med", "q1", "q3"}
FOOTPRINT_RADIUS = 1.0  # kernels that read the destination pixel's footprint (average, mode, ...)


@dataclass
class _Cells:
    """Summed-area tables of a file's validity cells over the window it was read in."""
    row0: int  # source pixel of cell (0, 0)
    col0: int
    good_hi: np.ndarray  # (rows+1, cols+1) int32: cells whose every pixel is good and above the nodata value
    good_lo: np.ndarray  # ... below it (the same table when the side does not matter)
    some: np.ndarray  # cells with a valid pixel in some band

    def count(self, sat: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
        """Cells counted in pixel rows [r0, r1] x cols [c0, c1] (inclusive pixel indexes, arrays),
        clipped to the window (outside it nothing is counted)."""
        h, w = sat.shape[0] - 1, sat.shape[1] - 1
        a = np.clip(np.floor_divide(r0 - self.row0, CELL), 0, h)
        b = np.clip(np.floor_divide(r1 - self.row0, CELL) + 1, 0, h)
        c = np.clip(np.floor_divide(c0 - self.col0, CELL), 0, w)
        d = np.clip(np.floor_divide(c1 - self.col0, CELL) + 1, 0, w)
        return sat[b, d] - sat[a, d] - sat[b, c] + sat[a, c]

    def all_good(self, r0, r1, c0, c1) -> np.ndarray:
        """Every cell touching the pixel rectangle good (and the rectangle inside the window)."""
        area = (np.floor_divide(r1 - self.row0, CELL) - np.floor_divide(r0 - self.row0, CELL) + 1) * \
               (np.floor_divide(c1 - self.col0, CELL) - np.floor_divide(c0 - self.col0, CELL) + 1)
        return (self.count(self.good_hi, r0, r1, c0, c1) == area) | (self.count(self.good_lo, r0, r1, c0, c1) == area)

    def any_valid(self, r0, r1, c0, c1) -> np.ndarray:
        return self.count(self.some, r0, r1, c0, c1) > 0


def _sat(cells: np.ndarray) -> np.ndarray:
    out = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(cells, axis=0, dtype=np.int32), axis=1, out=out[1:, 1:])
    return out


def _pool(mask: np.ndarray, how) -> np.ndarray:
    """(rows, cols) pixels -> cells (rows/CELL, cols/CELL): all() or any() of each cell; rows and cols
    padded with False to whole cells. With 8-pixel cells a cell row's 8 booleans are one 64-bit word,
    so each cell is the OR (any) or AND (all) of 8 words: a tenth of numpy's reduction over an axis of 8."""
    h, w = mask.shape
    ph, pw = -(-h // CELL) * CELL, -(-w // CELL) * CELL
    if (ph, pw) != (h, w):
        mask = np.pad(mask, ((0, ph - h), (0, pw - w)), constant_values=False)
    if CELL != _WORD:
        return how(how(mask.reshape(ph // CELL, CELL, pw // CELL, CELL), axis=3), axis=1)
    words = np.ascontiguousarray(mask, dtype=bool).view(np.uint64).reshape(ph // CELL, CELL, pw // CELL)
    if how is np.any:
        return np.bitwise_or.reduce(words, axis=1) != 0
    return np.bitwise_and.reduce(words, axis=1) == _ALL_TRUE


_WORD = np.dtype(np.uint64).itemsize  # booleans in a 64-bit word
_ALL_TRUE = int.from_bytes(b"\x01" * _WORD, "little")  # a word of booleans, every one True (in any byte order)


def _open(uri: str, path: str):
    """The file opened, or an error naming it (a file that went away, an object store that stopped answering)."""
    try:
        return rasterio.open(path)
    except RasterioError as e:
        raise InputError(uri, f"cannot be opened any more ({e})") from None


def _strip_cells(source: Source, uri: str, bands: int, resampling: str, window: Window) -> tuple:
    """The validity cells of `bands` bands of one file over a strip `window` (pixel offsets a multiple
    of CELL): ("every pixel good" above and below the nodata value, "some pixel valid"), not summed."""
    f = source.files[uri]
    nodata = source.nodata
    numeric_fill = np.dtype(source.dtype).kind != "f"  # integers: the nodata value is also the fill value
    power = resampling_domain(source) == LINEAR_POWER  # warped as linear power, back to dB
    with gdal_env([uri]), _open(uri, f.path) as ds:  # in this thread: endpoints and keys for s3:// inputs
        try:
            flags = [ds.mask_flag_enums[b] for b in range(bands)]
            masked = any(MaskFlags.per_dataset in fl or MaskFlags.alpha in fl for fl in flags)
            data = ds.read(list(range(1, bands + 1)), window=window)
            valid = valid_mask(data, nodata)
            some = _pool(valid[0] if bands == 1 else valid.any(axis=0), np.any)
            good = valid[0] if bands == 1 else valid.all(axis=0)
            if masked:
                good &= (ds.read_masks(list(range(1, bands + 1)), window=window) > 0).all(axis=0)
        except RasterioError as e:
            raise InputError(uri, f"cannot read pixels, the file is truncated or corrupt ({e})") from None
    if power and resampling not in CONVEX:  # negative lobes can make power negative: NaN dB
        hi = lo = _pool(np.zeros_like(good), np.all)
    elif numeric_fill and resampling not in ("nearest", "mode"):  # a computed value could equal the fill
        if resampling in CONVEX:
            hi = _pool(good & (data > nodata).all(axis=0), np.all)
            lo = _pool(good & (data < nodata).all(axis=0), np.all)
        else:
            hi = lo = _pool(np.zeros_like(good), np.all)
    else:
        hi = lo = _pool(good, np.all)
    return hi, lo, some


def _strips(source: Source, uri: str, bands: int, window: Window, block_rows: int = 1) -> list[Window]:
    """`window` cut into strips of about STRIP_BYTES of pixels whose edges are rows that are multiples
    of CELL and of the file's block rows (each block is decoded by one strip only)."""
    row_bytes = max(1, window.width * bands * np.dtype(source.files[uri].dtype).itemsize)
    step = math.lcm(CELL, block_rows)
    strip = max(step, STRIP_BYTES // row_bytes // step * step)
    end = window.row_off + window.height
    first = -(-window.row_off // step) * step  # the first block edge at or after the window's top
    edges = [window.row_off, *range(first + strip, end, strip), end]
    return [Window(window.col_off, a, window.width, b - a) for a, b in zip(edges, edges[1:])]


def _cells(window: Window, strips: list[tuple]) -> _Cells:
    """The summed-area tables of a file's window from its strips' cells, in row order."""
    hi, lo, some = zip(*strips)
    good_hi = _sat(np.concatenate(hi))
    good_lo = good_hi if all(x is y for x, y in zip(hi, lo)) else _sat(np.concatenate(lo))
    return _Cells(window.row_off, window.col_off, good_hi, good_lo, _sat(np.concatenate(some)))


def _chip_points(grid, positions: np.ndarray, k: int, n_side: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid-CRS x, y of points of each chip (flattened, chip-major): "outline" = corners and edge
    midpoints (8), "samples" = centres of an n_side x n_side lattice of its destination pixels."""
    res = grid.resolution * k
    size = grid.chip_size // k
    minx, _, _, maxy = grid.chip_bounds(positions[:, 1], positions[:, 0])
    if which == "outline":
        u = np.array([0, 0.5, 1, 1, 1, 0.5, 0, 0]) * size
        v = np.array([0, 0, 0, 0.5, 1, 1, 1, 0.5]) * size
    else:
        idx = np.floor((np.arange(n_side) + 0.5) * size / n_side) + 0.5
        u, v = (a.ravel() for a in np.meshgrid(idx, idx))
    x = minx[:, None] + u[None, :] * res
    y = maxy[:, None] - v[None, :] * res
    return x.ravel(), y.ravel()


def _to_pixels(grid_crs: CRS, ds_crs: CRS, inverse, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel (row, col) of grid-CRS points; NaN where they do not project."""
    if grid_crs != ds_crs:
        x, y = (np.asarray(a, dtype=np.float64) for a in transform_points(grid_crs, ds_crs, x, y))
    col, row = inverse * (x, y)
    row, col = np.asarray(row, dtype=np.float64), np.asarray(col, dtype=np.float64)
    bad = ~np.isfinite(row) | ~np.isfinite(col) | (np.abs(row) > FAR) | (np.abs(col) > FAR)
    row[bad] = np.nan
    col[bad] = np.nan
    return row, col


def _floor(a: np.ndarray) -> np.ndarray:
    return np.floor(a).astype(np.int64)


@dataclass
class _Reach:
    """One file of a source against the candidate chips: the chips whose reach meets it (`near`),
    their reach in its pixels (`box`: row0, row1, col0, col1, radius; an infinite radius for a chip
    that does not project, worked on as covering the whole raster: never VALID, never INVALID) and
    the window of pixels to read (None: nothing to read)."""
    source: Source
    uri: str
    bands: int
    resampling: str
    ds_crs: CRS
    inverse: object
    block_rows: int  # rows of the file's blocks (strips hold whole blocks: none is decoded twice)
    near: np.ndarray
    box: np.ndarray
    window: Window | None


def _reach(ing: Ingested, source: Source, uri: str, bands: int, resampling: str, positions: np.ndarray) -> _Reach:
    g = ing.grid
    k = source.spec.store_factor(g.resolution)
    size = g.chip_size // k
    n_side = min(SAMPLES, size)
    f = source.files[uri]
    with gdal_env([uri]), _open(uri, f.path) as ds:
        ds_crs, inverse, height, width = ds.crs, ~ds.transform, ds.height, ds.width
        block_rows = max(1, ds.block_shapes[0][0]) if ds.block_shapes else 1
    kernel = KERNEL_RADIUS.get(resampling, FOOTPRINT_RADIUS if resampling in CONVEX else 3.0)
    near, boxes = [], []
    for s0 in range(0, len(positions), CHIP_BATCH):
        part = positions[s0:s0 + CHIP_BATCH]
        rows, cols = (a.reshape(len(part), 8) for a in _to_pixels(g.crs, ds_crs, inverse,
                                                                  *_chip_points(g, part, k, n_side, "outline")))
        finite = np.isfinite(rows).all(axis=1) & np.isfinite(cols).all(axis=1)
        edges = np.hypot(np.diff(rows[:, [0, 2, 4, 6, 0]], axis=1), np.diff(cols[:, [0, 2, 4, 6, 0]], axis=1))
        scale = edges.max(axis=1) / size * 1.1  # source pixels per destination pixel
        radius = (kernel + 1.0) * np.maximum(1.0, scale) + 1.0
        with np.errstate(invalid="ignore"):
            r0, r1 = rows.min(axis=1) - radius, rows.max(axis=1) + radius
            c0, c1 = cols.min(axis=1) - radius, cols.max(axis=1) + radius
            hit = ~finite | ((r1 >= 0) & (r0 < height) & (c1 >= 0) & (c0 < width))
        idx = np.flatnonzero(hit)
        near.append(idx + s0)
        box = np.stack([np.where(finite, r0, 0), np.where(finite, r1, height), np.where(finite, c0, 0),
                        np.where(finite, c1, width), np.where(finite, radius, np.inf)], axis=1)[idx]
        boxes.append(box)
    near = np.concatenate(near) if near else np.empty(0, np.int64)
    box = np.concatenate(boxes) if boxes else np.empty((0, 5))
    usable = np.flatnonzero(np.isfinite(box[:, 4]))
    window = None
    if len(usable):
        lo_r = max(0, int(np.floor(box[usable, 0].min()))) // CELL * CELL
        lo_c = max(0, int(np.floor(box[usable, 2].min()))) // CELL * CELL
        hi_r = min(height, int(np.floor(box[usable, 1].max())) + 1)
        hi_c = min(width, int(np.floor(box[usable, 3].max())) + 1)
        window = Window(lo_c, lo_r, hi_c - lo_c, hi_r - lo_r)
    return _Reach(source, uri, bands, resampling, ds_crs, inverse, block_rows, near, box, window)


def _decide(ing: Ingested, r: _Reach, cells: _Cells | None, positions: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one file: (the chips whose reach meets it, (chips, samples) sample pixels surely good in
    it, chips with a valid pixel of it within reach). Only those chips are worked on, so a mosaic of
    many files costs what its chips cost."""
    g = ing.grid
    k = r.source.spec.store_factor(g.resolution)
    n_side = min(SAMPLES, g.chip_size // k)
    near, box = r.near, r.box
    good = np.zeros((len(near), n_side * n_side), dtype=bool)
    some = ~np.isfinite(box[:, 4])
    usable = np.flatnonzero(np.isfinite(box[:, 4]))
    if cells is None:
        return near, good, some
    b = box[usable]
    some[usable] = cells.any_valid(_floor(b[:, 0]), _floor(b[:, 1]), _floor(b[:, 2]), _floor(b[:, 3]))
    for s0 in range(0, len(usable), CHIP_BATCH):
        idx = usable[s0:s0 + CHIP_BATCH]
        rows, cols = _to_pixels(g.crs, r.ds_crs, r.inverse, *_chip_points(g, positions[near[idx]], k, n_side, "samples"))
        rad = np.repeat(box[idx, 4], n_side * n_side)
        finite = np.isfinite(rows) & np.isfinite(cols)
        rows, cols = np.where(finite, rows, -FAR), np.where(finite, cols, -FAR)
        hit = cells.all_good(_floor(rows - rad), _floor(rows + rad), _floor(cols - rad), _floor(cols + rad)) & finite
        good[idx] = hit.reshape(len(idx), n_side * n_side)
    return near, good, some


def screen_sources(ing: Ingested, sources: list[Source], resampling: dict, positions: np.ndarray,
                   workers: int = 1) -> np.ndarray:
    """(len(sources), n) VALID / INVALID / UNKNOWN of each source at chip `positions` ((n, 2) iy, ix).

    Every file of every source is read in strips of rows, all in one pool of `workers` threads, so a
    source of one large file is read as fast as a mosaic of many. Per source: VALID when one item
    (a file, or a stack of single-band files) is surely good at one sample pixel in every file of it;
    INVALID when no file has a valid pixel within reach. (Combining different items band by band
    could settle a few more chips; they are left UNKNOWN.)"""
    files = [(s, uri, max(len(bands) for item in s.items for u, bands in item if u == uri))
             for s in sources for uri in s.files]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reaches = list(pool.map(lambda t: _reach(ing, t[0], t[1], t[2], resampling[(t[0].name, t[1])], positions),
                                files))
        strips = [(i, w) for i, r in enumerate(reaches) if r.window is not None
                  for w in _strips(r.source, r.uri, r.bands, r.window, r.block_rows)]
        read = list(pool.map(lambda t: _strip_cells(reaches[t[0]].source, reaches[t[0]].uri, reaches[t[0]].bands,
                                                     reaches[t[0]].resampling, t[1]), strips))
        per_file = [[] for _ in reaches]
        for (i, _w), cells in zip(strips, read):
            per_file[i].append(cells)
        decided = list(pool.map(lambda i: _decide(ing, reaches[i], _cells(reaches[i].window, per_file[i])
                                                  if per_file[i] else None, positions), range(len(reaches))))
    results = {(r.source.name, r.uri): d for r, d in zip(reaches, decided)}
    return np.stack([_combine(s, {u: results[(s.name, u)] for u in s.files}, len(positions)) for s in sources])


def _combine(source: Source, results: dict, n: int) -> np.ndarray:
    some = np.zeros(n, dtype=bool)
    for near, _good, reach in results.values():
        some[near[reach]] = True
    valid = np.zeros(n, dtype=bool)
    for item in source.items:
        if len(item) == 1:
            near, good, _reach = results[item[0][0]]
            valid[near[good.any(axis=1)]] = True
            continue
        together = None  # a stack: the same sample pixel good in each of its files
        for uri, _bands in item:
            near, good, _reach = results[uri]
            here = np.zeros((n, good.shape[1]), dtype=bool)
            here[near] = good
            together = here if together is None else together & here
        valid |= together.any(axis=1)
    status = np.full(n, UNKNOWN, dtype=np.int8)
    status[~some] = INVALID
    status[valid] = VALID
    return status

"""The chip grid: a CRS, a resolution and chips anchored on fixed multiples of the stride.

Chip (ix, iy) covers x in [x0 + ix*S, x0 + ix*S + chip_size*res) and
y in (y0 - iy*S - chip_size*res, y0 - iy*S], with S = stride * res, so the same grid cell
always gets the same id whatever the AOI. iy grows southwards.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUFFER = "buffer"  # chips.parquet `split` of train chips next to a test block: in no split, read by no task
SPLIT_LABELS = SPLITS + (BUFFER,)

_SCAN_LEAF = 1 << 16  # chip boxes tested one by one at most at a time while finding candidates
MAX_CHIPS = 50_000_000  # a grid of more chips is refused before anything is allocated for it


def utm_epsg(lon: float, lat: float) -> int:
    return (32600 if lat >= 0 else 32700) + utm_zone(lon)


def utm_zone(lon: float) -> int:
    return min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))


def parse_crs(value: str | int) -> CRS:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return CRS.from_epsg(int(value))
    return CRS.from_user_input(value)


def transform_geometry(geom, src: CRS, dst: CRS, densify: int = 21):
    """Reprojects a polygon (or an array of them, with one transformer) after densifying each
    edge into `densify` segments, so edges that curve in the target CRS stay curved."""
    if src == dst:
        return geom
    tr = Transformer.from_crs(src, dst, always_xy=True)
    g = shapely.segmentize(geom, max_segment_length=_edge_step(geom, densify))
    return shapely.transform(g, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def aoi_crs_hint(bounds: tuple[float, float, float, float], declared: CRS, feet84: list, crss: list[CRS]) -> str:
    """For an AOI that overlaps none of the sources: what its coordinates (`bounds`, in the CRS the
    file `declared`) look like, and a CRS that would put them on the sources (their footprints
    `feet84` in lon/lat): each source's CRS, the UTM zone of the sources, Web Mercator and lon/lat,
    also with x and y swapped. "" when none does."""
    w, s, e, n = bounds
    degrees = -180 <= w <= e <= 180 and -90 <= s <= n <= 90
    feet = shapely.union_all(feet84)
    c = feet.centroid
    candidates = list(dict.fromkeys([CRS.from_epsg(4326), *crss, CRS.from_epsg(utm_epsg(c.x, c.y)), CRS.from_epsg(3857)]))
    box = shapely.box(w, s, e, n)
    for swapped in (False, True):
        g = shapely.box(s, w, n, e) if swapped else box
        for crs in candidates:
            if crs == declared and not swapped:
                continue
            try:
                g84 = transform_geometry(g, crs, CRS.from_epsg(4326), densify=4)
            except Exception:  # noqa: BLE001 - coordinates outside the candidate's domain: not this one
                continue
            if g84.is_valid and not g84.is_empty and np.isfinite(g84.bounds).all() and g84.intersects(feet):
                name = crs.to_string()
                return (f"its coordinates {tuple(round(v, 5) for v in bounds)} lie on the sources if read as {name}"
                        + (" with x and y swapped" if swapped else "") + f", not as the declared {declared.to_string()}")
    looks = "degrees (lon/lat)" if degrees else "projected (not degrees)"
    return f"its coordinates {tuple(round(v, 5) for v in bounds)} look {looks}, declared {declared.to_string()}"


def _edge_step(geom, densify: int):
    b = shapely.bounds(geom)
    return np.maximum(np.maximum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]), 1e-12) / densify


def _num(v: float) -> str:
    """A number for an id: `:g` when that is exact (the ids grids have always had), else every
    digit of the shortest exact decimal (never an exponent or a comma)."""
    short = f"{v:g}"
    return short if float(short) == v else np.format_float_positional(float(v), trim="-")


@dataclass(frozen=True)
class ChipGrid:
    crs: CRS
    resolution: float
    chip_size: int
    overlap: int
    origin: tuple[float, float]
    aoi: BaseGeometry  # in the grid CRS
    # where chips can hold data (grid CRS; ingest passes the footprint every required source
    # covers), or None: candidates must come within a chip of it (its outline is approximate),
    # so planning never spans empty space, and the split weighs chips by their area inside it
    coverage: BaseGeometry | None = None

    @property
    def stride(self) -> int:
        return self.chip_size - self.overlap

    @property
    def step(self) -> float:
        """Distance between neighbouring chip origins, in grid CRS units."""
        return self.stride * self.resolution

    @property
    def extent(self) -> float:
        return self.chip_size * self.resolution

    @cached_property
    def key(self) -> str:
        epsg = self.crs.to_epsg()
        crs = f"EPSG{epsg}" if epsg else "crs" + hashlib.sha256(self.crs.to_wkt().encode()).hexdigest()[:8]
        key = f"{crs}_r{_num(self.resolution)}_c{self.chip_size}_s{self.stride}"
        if self.origin != (0.0, 0.0):
            x, y = (np.format_float_positional(float(v), trim="-") for v in self.origin)
            key += f"_o{x}_{y}"  # full precision, no comma (ids end up in CSVs and URLs)
        return key

    def chip_id(self, ix: int, iy: int) -> str:
        return f"{self.key}_x{ix}_y{iy}"

    def chip_bounds(self, ix, iy):
        """(minx, miny, maxx, maxy) of chips, scalars or arrays."""
        x0, y0 = self.origin
        minx = x0 + np.asarray(ix) * self.step
        maxy = y0 - np.asarray(iy) * self.step
        return minx, maxy - self.extent, minx + self.extent, maxy

    def centre_bounds(self, ix, iy):
        """(minx, miny, maxx, maxy) of the box spanned by the centres of chips' pixels (scalars or arrays)."""
        minx, miny, maxx, maxy = self.chip_bounds(ix, iy)
        half = self.resolution / 2
        return minx + half, miny + half, maxx - half, maxy - half

    def chip_transform(self, ix: int, iy: int) -> Affine:
        """Pixel-to-grid transform of a window starting at chip (ix, iy)."""
        minx, _, _, maxy = self.chip_bounds(ix, iy)
        return Affine(self.resolution, 0.0, float(minx), 0.0, -self.resolution, float(maxy))

    def window_pixels(self, chips: int) -> int:
        """Side in pixels of a window spanning `chips` chips along one axis."""
        return (chips - 1) * self.stride + self.chip_size

    def _search_area(self) -> BaseGeometry:
        return self.aoi if self.coverage is None else shapely.intersection(
            self.aoi, shapely.buffer(self.coverage, self.extent))

    def estimated_chips(self) -> int:
        """About how many chips intersect the AOI (and coverage): its area plus a chip-wide band
        along its outline, in chips; computed from the geometry alone, nothing allocated."""
        area = self._search_area()
        if area.is_empty:
            return 0
        return int(math.ceil((area.area + area.length * self.extent + self.extent ** 2) / self.step ** 2))

    def size_problem(self, limit: int = MAX_CHIPS) -> str | None:
        """Why this grid is too large to plan (its chip count beyond `limit`), or None."""
        n = self.estimated_chips()
        if n <= limit:
            return None
        return (f"the grid would have about {n:,} chips (resolution {_num(self.resolution)} grid-CRS units, "
                f"chip_size {self.chip_size}, stride {self.stride}; the limit is {limit:,}): raise "
                f"grid.resolution or grid.chip_size, or shrink grid.aoi")

    @cached_property
    def candidates(self) -> np.ndarray:
        """(iy, ix) of every chip in the AOI (and the coverage, when there is one), north to south
        then west to east. A chip is in it when the AOI meets the box spanned by the chip's pixel
        centres (`centre_bounds`): a chip that only touches it, or meets it by a sliver thinner
        than half a pixel along its edge, has no pixel centre there and is not a candidate (the
        footprints' round trip through WGS84 leaves such slivers along an `intersection` AOI:
        a ring of chips without data that planning would otherwise have to warp to rule out).

        Found by halving the AOI's bounding range of chips: a part that misses the AOI is
        dropped whole, a part inside it is taken whole, and only parts along its edge of at most
        `_SCAN_LEAF` chips are tested chip by chip. Memory follows the chips found, not the AOI's
        bounding box (an AOI of four patches across Europe has a continent-sized box). A grid of
        more than `MAX_CHIPS` chips is refused first (`size_problem`)."""
        problem = self.size_problem()
        if problem:
            from sarflow.errors import InputError

            raise InputError(f"grid {self.key}", problem)
        area = self._search_area()
        if area.is_empty:
            return np.empty((0, 2), dtype=np.int64)
        x0, y0 = self.origin
        minx, miny, maxx, maxy = area.bounds
        eps = 1e-9
        ix_lo = math.floor((minx - x0 - self.extent) / self.step + eps) + 1
        ix_hi = math.ceil((maxx - x0) / self.step - eps) - 1
        iy_lo = math.floor((y0 - maxy - self.extent) / self.step + eps) + 1
        iy_hi = math.ceil((y0 - miny) / self.step - eps) - 1
        if ix_hi < ix_lo or iy_hi < iy_lo:
            return np.empty((0, 2), dtype=np.int64)
        shapely.prepare(area)
        found: list[np.ndarray] = []
        todo = [(iy_lo, iy_hi, ix_lo, ix_hi)]
        while todo:
            ya, yb, xa, xb = todo.pop()
            left, _, _, top = self.chip_bounds(xa, ya)
            _, bottom, right, _ = self.chip_bounds(xb, yb)
            box = shapely.box(float(left), float(bottom), float(right), float(top))
            if not area.intersects(box):
                continue
            n = (yb - ya + 1) * (xb - xa + 1)
            if area.contains(box):  # every chip inside: its interior meets the AOI's
                iy, ix = np.meshgrid(np.arange(ya, yb + 1), np.arange(xa, xb + 1), indexing="ij")
                found.append(np.column_stack([iy.ravel(), ix.ravel()]))
            elif n <= _SCAN_LEAF:
                iy, ix = np.meshgrid(np.arange(ya, yb + 1), np.arange(xa, xb + 1), indexing="ij")
                iy, ix = iy.ravel(), ix.ravel()
                boxes = shapely.box(*self.centre_bounds(ix, iy))
                hit = shapely.intersects(area, boxes) & ~shapely.touches(area, boxes)
                found.append(np.column_stack([iy[hit], ix[hit]]))
            elif yb - ya >= xb - xa:
                mid = (ya + yb) // 2
                todo += [(ya, mid, xa, xb), (mid + 1, yb, xa, xb)]
            else:
                mid = (xa + xb) // 2
                todo += [(ya, yb, xa, mid), (ya, yb, mid + 1, xb)]
        if not found:
            return np.empty((0, 2), dtype=np.int64)
        cand = np.concatenate(found).astype(np.int64)
        return cand[np.lexsort((cand[:, 1], cand[:, 0]))]

    @cached_property
    def data_area(self) -> BaseGeometry:
        """The part of the AOI where chips can hold data (the AOI within the coverage)."""
        area = self.aoi if self.coverage is None else shapely.intersection(self.aoi, self.coverage)
        shapely.prepare(area)
        return area

    def chip_weights(self, ix, iy) -> np.ndarray:
        """Fraction of each chip's area inside `data_area`: 1 inside it, 0 for a chip that only
        skirts it (such chips are usually dropped for lack of data), between along its edge."""
        ix, iy = np.asarray(ix), np.asarray(iy)
        out = np.ones(ix.size, dtype=np.float64)
        area = self.data_area
        for lo in range(0, ix.size, _SCAN_LEAF):
            sl = slice(lo, lo + _SCAN_LEAF)
            boxes = shapely.box(*self.chip_bounds(ix[sl], iy[sl]))
            edge = ~shapely.contains(area, boxes)
            if edge.any():
                part = out[sl]
                part[edge] = shapely.area(shapely.intersection(area, boxes[edge])) / self.extent**2
        return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------- the split

AUTO_TARGET_BLOCKS = 1000  # `auto` block side: about this many blocks (one chip per block below ~2,000 chips)
SEGMENTS = 20  # runs of blocks along a Hilbert curve, of equal chip counts, dealt to the splits whole
MAX_BUFFER_SHARE = 1 / 3  # the train-test buffer is dropped (with a warning) when it would take more of train
MIN_EVAL_CHIPS = 10  # fewer val or test chips (or blocks) than these get a warning
MIN_EVAL_BLOCKS = 2


def auto_block_side(n_chips: int) -> int:
    """Side in chips of a split block, from the number of candidate chips: about
    AUTO_TARGET_BLOCKS blocks, so fractions hold to within a block and the buffer (one block
    wide) costs a few percent of train."""
    return max(1, int(round(math.sqrt(n_chips / AUTO_TARGET_BLOCKS))))


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """Distance along a Hilbert curve of cells (x, y), integers in [0, 2**order): cells close
    on the curve are close in space, so a run of the curve is a compact patch."""
    x, y = np.array(x, dtype=np.int64), np.array(y, dtype=np.int64)
    n = 1 << order
    d = np.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x, y = np.where(flip, n - 1 - x, x), np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


@dataclass(frozen=True)
class Split:
    """The split of every candidate chip: a label per chip (`labels`, in the order given),
    `split[(iy, ix)]` for one chip, and what was achieved (`summary()`)."""

    iy: np.ndarray
    ix: np.ndarray
    codes: np.ndarray  # int8 index into SPLIT_LABELS, per chip
    block: int  # side of a block in chips
    n_blocks: int
    buffered: bool
    counts: dict  # label -> {"chips": n, "blocks": n}

    @cached_property
    def _lookup(self):
        iy0, ix0 = (int(self.iy.min()), int(self.ix.min())) if self.iy.size else (0, 0)
        width = int(self.ix.max()) - ix0 + 1 if self.ix.size else 1
        keys = (self.iy - iy0) * width + (self.ix - ix0)
        order = np.argsort(keys, kind="stable")
        return iy0, ix0, width, keys[order], self.codes[order]

    def __getitem__(self, chip: tuple[int, int]) -> str:
        iy0, ix0, width, keys, codes = self._lookup
        iy, ix = chip
        key = (iy - iy0) * width + (ix - ix0)
        pos = int(np.searchsorted(keys, key))
        if not (0 <= ix - ix0 < width and pos < keys.size and keys[pos] == key):
            raise KeyError(chip)
        return SPLIT_LABELS[codes[pos]]

    @property
    def labels(self) -> np.ndarray:
        return np.array(SPLIT_LABELS, dtype=object)[self.codes]

    def summary(self) -> dict:
        return {"block_chips": self.block, "blocks": self.n_blocks, "buffer": self.buffered, "candidates": self.counts}

    def describe(self) -> str:
        c = self.counts
        parts = ", ".join(f"{s} {c[s]['chips']} chips ({c[s]['blocks']} blocks)" for s in SPLIT_LABELS)
        return f"{int(self.codes.size)} candidate chips in {self.n_blocks} blocks of {self.block}x{self.block} chips: {parts}"


def _cut(cum: np.ndarray, target: float, lo: int, hi: int) -> int:
    """Number of leading blocks whose chips come closest to `target` (cum[k] = chips of the
    first k blocks), kept within [lo, hi]."""
    k = int(np.argmin(np.abs(cum - target)))
    return min(max(k, lo), hi)


def block_split(grid: ChipGrid, ix: np.ndarray, iy: np.ndarray, block: int | str,
                fractions: tuple[float, float, float]) -> Split:
    """Spatially blocked split whose fractions hold in chips.

    - Chips are grouped in `block` x `block` cells (`"auto"` or 0: `auto_block_side`); a block
      goes whole to one split.
    - Blocks are laid along a Hilbert curve and cut into SEGMENTS runs of equal chip counts
      (compact patches); runs are ranked by a stable hash of their first block's grid position,
      and the blocks, run after run, are cut where the cumulative chip count meets the test,
      then the val fraction; the rest is train. Test and val are thus a few compact patches.
      Chips count by their area inside the grid's data area (`ChipGrid.chip_weights`), so the
      fractions hold in the chips that will have data, not in slivers along the AOI's edge.
    - Train blocks next to a test block (8-neighbourhood) become `buffer`: a strip one block
      wide that no task reads, so no train chip touches a test chip. When that would take more
      than MAX_BUFFER_SHARE of train, there is no buffer, and a warning says so.
    - A warning names the achieved counts when val or test get fewer than MIN_EVAL_CHIPS chips
      or MIN_EVAL_BLOCKS blocks.
    The result depends only on the chips, the grid and the options: the same on every run,
    every machine and whatever the number of workers."""
    ix, iy = np.asarray(ix, dtype=np.int64), np.asarray(iy, dtype=np.int64)
    if block in ("auto", 0, None):
        # chips k apart overlap while k * stride < chip_size: the one-block buffer must span them
        side = max(auto_block_side(ix.size), -(-grid.chip_size // grid.stride) - 1)
    elif isinstance(block, str) or int(block) < 1:
        raise ValueError(f"split block must be 'auto', 0 (auto) or a positive number of chips, not {block!r}")
    else:
        side = int(block)
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive sum, not {fractions}")
    empty = {s: {"chips": 0, "blocks": 0} for s in SPLIT_LABELS}
    if ix.size == 0:
        return Split(iy, ix, np.empty(0, np.int8), side, 0, False, empty)

    cy, cx = np.floor_divide(iy, side), np.floor_divide(ix, side)
    cy0, cx0 = int(cy.min()), int(cx.min())
    width = int(cx.max()) - cx0 + 1
    uniq, inverse, sizes = np.unique((cy - cy0) * width + (cx - cx0), return_inverse=True, return_counts=True)
    del cy, cx
    inverse = inverse.ravel()
    nb = len(uniq)
    by, bx = uniq // width + cy0, uniq % width + cx0
    rel_x, rel_y = bx - bx.min(), by - by.min()
    order_bits = max(1, int(max(rel_x.max(), rel_y.max())).bit_length())
    along = np.argsort(hilbert_index(rel_x, rel_y, order_bits), kind="stable")  # blocks along the curve
    weight = np.bincount(inverse, weights=grid.chip_weights(ix, iy), minlength=nb)  # chips' worth per block
    if not weight.sum() > 0:
        weight = sizes.astype(np.float64)
    total = float(weight.sum())
    before = np.concatenate([[0.0], np.cumsum(weight[along])[:-1]])
    k = min(SEGMENTS, nb)
    segment = np.minimum(np.floor((before + weight[along] / 2) * k / total), k - 1)  # by each block's middle
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    digests = [hashlib.sha256(f"{grid.key}|{side}|{bx[along[j]]}|{by[along[j]]}".encode()).hexdigest()
               for j in starts.tolist()]
    seg_rank = np.empty(len(starts), dtype=np.int64)
    seg_rank[np.argsort(digests, kind="stable")] = np.arange(len(starts))
    run = np.repeat(seg_rank, np.diff(np.r_[starts, nb]))
    dealt = along[np.lexsort((np.arange(nb), run))]  # runs in hash order, each along the curve

    f = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    cum = np.concatenate([[0.0], np.cumsum(weight[dealt])])
    need = 1 if nb >= 3 else 0
    n_test = _cut(cum, total * f[2], need if f[2] > 0 else 0, nb - (need if f[0] > 0 else 0) - (need if f[1] > 0 else 0))
    n_tv = _cut(cum, total * (f[2] + f[1]), n_test + (need if f[1] > 0 else 0), nb - (need if f[0] > 0 else 0))
    code = np.zeros(nb, dtype=np.int8)  # train
    code[dealt[n_test:n_tv]] = 1
    code[dealt[:n_test]] = 2

    # the buffer: train blocks touching a test block
    span = int(bx.max() - bx.min()) + 3
    bkey = (by - by.min() + 1) * span + (bx - bx.min() + 1)
    test_keys = bkey[code == 2]
    near = np.unique((test_keys[:, None] + (np.array([-span, 0, span])[:, None] + np.array([-1, 0, 1])).ravel()).ravel())
    next_to_test = (code == 0) & np.isin(bkey, near)
    train_chips, buffer_chips = int(sizes[code == 0].sum()), int(sizes[next_to_test].sum())
    buffered = bool(buffer_chips > 0 and weight[next_to_test].sum() <= MAX_BUFFER_SHARE * weight[code == 0].sum())
    if buffered:
        code[next_to_test] = 3
    counts = {s: {"chips": int(sizes[code == i].sum()), "blocks": int((code == i).sum())} for i, s in enumerate(SPLIT_LABELS)}
    split = Split(iy, ix, code[inverse], side, nb, buffered, counts)

    problems = []
    if buffer_chips and not buffered:
        problems.append(f"no buffer between train and test: it would take {buffer_chips} of {train_chips} train chips")
    for i, name in ((1, "val"), (2, "test")):
        if f[i] > 0 and (counts[name]["chips"] < MIN_EVAL_CHIPS or counts[name]["blocks"] < MIN_EVAL_BLOCKS):
            problems.append(f"{name} has fewer than {MIN_EVAL_CHIPS} chips or {MIN_EVAL_BLOCKS} blocks")
    if problems:
        log.warning("the AOI is too small for the split %s: %s; %s", "/".join(f"{v:g}" for v in fractions),
                    "; ".join(problems), split.describe())
    else:
        log.info("split: %s", split.describe())
    return split

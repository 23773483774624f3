"""The chip grid: a CRS, a resolution and chips anchored on fixed multiples of the stride.

Chip (ix, iy) covers x in [x0 + ix*S, x0 + ix*S + chip_size*res) and
y in (y0 - iy*S - chip_size*res, y0 - iy*S], with S = stride * res, so the same grid cell
always gets the same id whatever the AOI. iy grows southwards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry

SPLITS = ("train", "val", "test")

_SCAN_LEAF = 1 << 16  # chip boxes tested one by one at most at a time while finding candidates


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

    def chip_transform(self, ix: int, iy: int) -> Affine:
        """Pixel-to-grid transform of a window starting at chip (ix, iy)."""
        minx, _, _, maxy = self.chip_bounds(ix, iy)
        return Affine(self.resolution, 0.0, float(minx), 0.0, -self.resolution, float(maxy))

    def window_pixels(self, chips: int) -> int:
        """Side in pixels of a window spanning `chips` chips along one axis."""
        return (chips - 1) * self.stride + self.chip_size

    @cached_property
    def candidates(self) -> np.ndarray:
        """(iy, ix) of every chip intersecting the AOI (and the coverage, when there is one),
        north to south then west to east.

        Found by halving the AOI's bounding range of chips: a part that misses the AOI is
        dropped whole, a part inside it is taken whole, and only parts along its edge of at most
        `_SCAN_LEAF` chips are tested chip by chip. Memory follows the chips found, not the AOI's
        bounding box (an AOI of four patches across Europe has a continent-sized box)."""
        area = self.aoi if self.coverage is None else shapely.intersection(
            self.aoi, shapely.buffer(self.coverage, self.extent))
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
                boxes = shapely.box(*self.chip_bounds(ix, iy))
                # touching the AOI on an edge is not intersecting it
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


def block_split(grid: ChipGrid, ix: np.ndarray, iy: np.ndarray, block: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Spatially blocked split: all chips of one `block` x `block` cell share a split, so
    neighbours don't straddle train and test. Cells are ranked by a stable hash of their grid
    position and cut by the fractions (at least one cell each for val and test when there are
    three or more), so a split is the same on every run and every machine."""
    cells = np.column_stack([np.floor_divide(ix, block), np.floor_divide(iy, block)])
    uniq, inverse = np.unique(cells, axis=0, return_inverse=True)
    digests = [hashlib.sha256(f"{grid.key}|{block}|{cx}|{cy}".encode()).hexdigest() for cx, cy in uniq.tolist()]
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(digests, kind="stable")] = np.arange(len(uniq))
    total = sum(fractions)
    n = len(uniq)
    n_test = int(round(n * fractions[2] / total))
    n_val = int(round(n * fractions[1] / total))
    if n >= 3:
        n_test, n_val = max(1, n_test) if fractions[2] > 0 else 0, max(1, n_val) if fractions[1] > 0 else 0
    n_train = n - n_val - n_test
    cell_split = np.where(rank < n_train, "train", np.where(rank < n_train + n_val, "val", "test"))
    return cell_split[inverse.ravel()].astype(object)

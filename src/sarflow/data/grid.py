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


def utm_epsg(lon: float, lat: float) -> int:
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return (32600 if lat >= 0 else 32700) + zone


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


@dataclass(frozen=True)
class ChipGrid:
    crs: CRS
    resolution: float
    chip_size: int
    overlap: int
    origin: tuple[float, float]
    aoi: BaseGeometry  # in the grid CRS

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
        key = f"{crs}_r{self.resolution:g}_c{self.chip_size}_s{self.stride}"
        if self.origin != (0.0, 0.0):
            key += f"_o{self.origin[0]:g},{self.origin[1]:g}"
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
        """(iy, ix) of every chip intersecting the AOI, north to south then west to east."""
        x0, y0 = self.origin
        minx, miny, maxx, maxy = self.aoi.bounds
        eps = 1e-9
        ix_lo = math.floor((minx - x0 - self.extent) / self.step + eps) + 1
        ix_hi = math.ceil((maxx - x0) / self.step - eps) - 1
        iy_lo = math.floor((y0 - maxy - self.extent) / self.step + eps) + 1
        iy_hi = math.ceil((y0 - miny) / self.step - eps) - 1
        iy, ix = np.meshgrid(np.arange(iy_lo, iy_hi + 1), np.arange(ix_lo, ix_hi + 1), indexing="ij")
        iy, ix = iy.ravel(), ix.ravel()
        if iy.size == 0:
            return np.empty((0, 2), dtype=np.int64)
        boxes = shapely.box(*self.chip_bounds(ix, iy))
        prepared = self.aoi
        shapely.prepare(prepared)
        # touching the AOI on an edge is not intersecting it
        hit = shapely.intersects(prepared, boxes) & ~shapely.touches(prepared, boxes)
        return np.column_stack([iy[hit], ix[hit]]).astype(np.int64)


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

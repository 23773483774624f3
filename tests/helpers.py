"""Test helpers: an independent reference (gdalwarp) and catalog writing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import rasterio
import yaml


def write_catalog(path: Path, grid: dict, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"grid": grid, "sources": sources}, sort_keys=False))
    return path


def gdalwarp_reference(src: str | list[str], out: Path, crs: str, res: float, extent: tuple, method: str,
                       dst_nodata=None, src_nodata=None, extra=()) -> np.ndarray:
    """Warps with GDAL's own command-line tool onto the same grid: the independent reference."""
    srcs = [src] if isinstance(src, str) else list(src)
    cmd = ["gdalwarp", "-q", "-overwrite", "-t_srs", crs, "-tr", repr(res), repr(res),
           "-te", *[repr(float(v)) for v in extent], "-r", method, "-of", "GTiff", *extra]
    if src_nodata is not None:
        cmd += ["-srcnodata", str(src_nodata)]
    if dst_nodata is not None:
        cmd += ["-dstnodata", str(dst_nodata)]
    subprocess.run(cmd + srcs + [str(out)], check=True, capture_output=True, text=True)
    with rasterio.open(out) as ds:
        return ds.read()


def chip_windows(table, res: float):
    """Full extent of the chips and each chip's (row, col) offset in it."""
    minx, maxy = table["minx"].min(), table["maxy"].max()
    maxx, miny = table["maxx"].max(), table["miny"].min()
    rows = np.rint((maxy - table["maxy"].to_numpy()) / res).astype(int)
    cols = np.rint((table["minx"].to_numpy() - minx) / res).astype(int)
    return (minx, miny, maxx, maxy), rows, cols

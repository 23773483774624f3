"""Any AOI in bounded memory (issue 12, item 8): ingest and grid planning follow the chips, not
the AOI's bounding box; `crs: utm` over several zones is refused up front; chip ids with an
origin keep every digit; tile logs the candidates it drops for lack of data."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import from_origin

from helpers import write_catalog
from sarflow.data import grid as grid_module
from sarflow.data.catalog import load_catalog
from sarflow.data.grid import ChipGrid
from sarflow.data.ingest import ingest
from sarflow.errors import InputError

SARFLOW = str(Path(sys.executable).with_name("sarflow"))
GB = 1024**3

# four small patches in three UTM zones, 1,000 km apart north-south (BigEarthNet-like): the
# bounding box of the union is about 5 million chips of 320 m, the union itself about 100
PATCHES = [(32629, -8.0, 40.0), (32630, -2.0, 50.0), (32631, 4.0, 60.0), (32629, -7.0, 41.0)]


def _patch(path: Path, epsg: int, lon: float, lat: float, seed: int, n: int = 128, nan_rows: int = 0,
           snap: float = 10.0) -> None:
    x, y = (round(v / snap) * snap for v in Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat))
    data = np.random.default_rng(seed).normal(-12, 3, (2, n, n)).astype("float32")
    data[:, :nan_rows] = np.nan
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=2, dtype="float32", crs=f"EPSG:{epsg}",
                       transform=from_origin(x, y, 10.0, 10.0), nodata=float("nan"),
                       tiled=True, blockxsize=64, blockysize=64) as ds:
        ds.write(data)


def _three_zone_catalog(root: Path, aoi, crs, patches=PATCHES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (epsg, lon, lat) in enumerate(patches):
        _patch(root / f"s1_{i}.tif", epsg, lon, lat, seed=i)
        _patch(root / f"coh_{i}.tif", epsg, lon, lat, seed=10 + i)
    sources = [{"name": "s1", "uris": [f"s1_{i}.tif" for i in range(len(patches))], "bands": ["VV", "VH"],
                "units": "dB", "kind": "continuous"},
               {"name": "coh", "uris": [f"coh_{i}.tif" for i in range(len(patches))], "bands": ["c12", "c24"],
                "units": "coherence", "kind": "continuous"}]
    return write_catalog(root / "catalog.yaml", {"crs": crs, "resolution": 10.0, "chip_size": 32, "aoi": aoi}, sources)


def _run_measured(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `args` in a child of a fresh wrapper process (so other tests' children don't count),
    under a 4 GB address-space cap (a regression fails fast instead of eating the machine), and
    returns the result and the child's peak RSS in bytes (ru_maxrss after it exits)."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=cap, timeout=120)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr, 'peak': peak}))\n"
    )
    w = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=cwd, timeout=180)
    assert w.returncode == 0, w.stderr
    r = json.loads(w.stdout)
    return subprocess.CompletedProcess(args, r["rc"], r["out"], r["err"]), r["peak"]


@pytest.mark.parametrize("aoi", ["union", "intersection"])
def test_ingest_of_an_aoi_across_three_utm_zones_stays_small(tmp_path, aoi):
    catalog = _three_zone_catalog(tmp_path / aoi, aoi, 3035)
    manifest = tmp_path / "manifest.json"
    proc, peak = _run_measured([SARFLOW, "ingest", str(catalog), "--out", str(manifest)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert peak < 2 * GB, f"ingest peaked at {peak / GB:.2f} GB"  # it was 10.7 GB (killed at 18.8 GB on BigEarthNet)
    m = json.loads(manifest.read_text())
    assert CRS.from_user_input(m["grid"]["crs"]).to_epsg() == 3035
    assert [len(s["files"]) for s in m["sources"]] == [4, 4]
    minx, miny, maxx, maxy = m["grid"]["aoi_bounds"]
    assert maxx - minx > 700_000 and maxy - miny > 2_000_000  # a box of ~5 million chips of 320 m

    # the candidates are the chips of the four patches: each patch planned alone gives the same
    grid = ingest(load_catalog(catalog), checksum=False).grid
    per_patch = 0
    for part in grid.aoi.geoms:
        alone = ChipGrid(grid.crs, grid.resolution, grid.chip_size, grid.overlap, grid.origin, part)
        per_patch += len(alone.candidates)
    assert len(grid.candidates) == per_patch
    assert 4 * 16 <= per_patch <= 4 * 36  # 1.28 km patches, 320 m chips, turned in EPSG:3035


def test_utm_over_three_zones_is_refused_up_front_naming_the_zones(tmp_path):
    catalog = _three_zone_catalog(tmp_path / "utm", "union", "utm")
    proc, peak = _run_measured([SARFLOW, "ingest", str(catalog)], tmp_path)
    assert proc.returncode == 2
    assert peak < 2 * GB
    err = " ".join(proc.stderr.split())
    assert str(catalog) in err
    assert "spans UTM zones 29 (EPSG:32629), 30 (EPSG:32630), 31 (EPSG:32631)" in err
    assert "set grid.crs to one EPSG code" in err and "3035" in err and "one catalog per zone" in err
    assert "Traceback" not in proc.stderr


def test_utm_takes_the_centroid_zone_for_an_aoi_straddling_two_neighbouring_zones(tmp_path):
    # two touching patches on both sides of the 29/30 boundary (-6 degrees), each in its own zone
    catalog = _three_zone_catalog(tmp_path / "straddle", "union", "utm",
                                  patches=[(32629, -6.01, 45.0), (32630, -6.0, 45.0)])
    grid = ingest(load_catalog(catalog), checksum=False).grid
    assert grid.crs.to_epsg() == 32630  # the union's centroid is east of -6 degrees
    assert len(grid.candidates) > 0


def test_a_bbox_aoi_far_larger_than_the_data_plans_only_chips_near_the_data(tmp_path, caplog):
    from sarflow.data.tile import TileOptions, tile

    root = tmp_path / "big"
    root.mkdir()
    _patch(root / "s1.tif", 32631, 3.0, 45.0, seed=1, nan_rows=64, snap=320.0)  # 4x4 chips, the northern half nodata
    catalog = write_catalog(root / "catalog.yaml",
                            {"crs": 32631, "resolution": 10.0, "chip_size": 32, "aoi": [-10.0, 35.0, 20.0, 60.0]},
                            [{"name": "s1", "uris": ["s1.tif"], "bands": ["VV", "VH"], "units": "dB",
                              "kind": "continuous"}])
    grid = ingest(load_catalog(catalog), checksum=False).grid
    # the AOI's box holds millions of chips; only the 4x4 chips of the file and a ring of one chip are planned
    assert grid.aoi.area / grid.extent**2 > 1e6
    assert len(grid.candidates) == 6 * 6
    with caplog.at_level(logging.INFO, logger="sarflow.data.tile"):
        store = tile(load_catalog(catalog), tmp_path / "chips.zarr", TileOptions(shard_chips=8), show_progress=False)
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept ")]
    assert len(kept) == 1, [r.getMessage() for r in caplog.records]
    import zarr

    n = zarr.open_group(str(store), mode="r").attrs["chips"]
    assert n == 8  # the southern 4 x 2 chips of the file hold data
    dropped = len(grid.candidates) - n
    assert kept[0].startswith(f"kept {n} of {len(grid.candidates)} candidate chips ({dropped} dropped: no valid pixel "
                              "in a required source: s1)")


def test_candidates_match_a_chip_by_chip_scan(monkeypatch):
    """Halving the AOI's range of chips finds exactly the chips a full scan finds (a chip is in the
    AOI when the AOI meets the box of its pixel centres: touching an edge, or a sliver thinner than
    half a pixel, is not), with and without overlap."""
    monkeypatch.setattr(grid_module, "_SCAN_LEAF", 64)
    aoi = shapely.Point(5000, 7000).buffer(9000).union(shapely.box(-8000, -2000, 30000, 1000)).difference(
        shapely.Point(3000, 5000).buffer(3000))
    aoi = shapely.union(aoi, shapely.box(40000, 0, 40320, 320))  # a part exactly one chip, edges on the grid
    for overlap in (0, 16):
        g = ChipGrid(CRS.from_epsg(32631), 10.0, 32, overlap, (0.0, 0.0), aoi)
        minx, miny, maxx, maxy = aoi.bounds
        ix, iy = np.meshgrid(np.arange(math.floor(minx / g.step) - 2, math.ceil(maxx / g.step) + 2),
                             np.arange(math.floor(-maxy / g.step) - 2, math.ceil(-miny / g.step) + 2))
        ix, iy = ix.ravel(), iy.ravel()
        minx, miny, maxx, maxy = g.chip_bounds(ix, iy)
        boxes = shapely.box(minx + 5, miny + 5, maxx - 5, maxy - 5)  # the chips' pixel centres (10 m pixels)
        hit = shapely.intersects(aoi, boxes) & ~shapely.touches(aoi, boxes)
        expected = np.column_stack([iy[hit], ix[hit]])
        expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
        np.testing.assert_array_equal(g.candidates, expected)
        if overlap == 0:  # the one-chip part is chip (125, -1); its neighbours only touch it
            found = {(x, y) for y, x in g.candidates.tolist()}
            assert (125, -1) in found and not {(124, -1), (126, -1), (125, -2), (125, 0)} & found
    # a sliver of 3 m (0.3 px) into the next chip misses its pixel centres; 6 m reaches them
    for reach, chips in ((3, [(0, 0)]), (6, [(0, 0), (0, 1)])):
        g = ChipGrid(CRS.from_epsg(32631), 10.0, 32, 0, (0.0, 0.0), shapely.box(0, -320, 320 + reach, 0))
        assert [tuple(c) for c in g.candidates.tolist()] == chips
    # a grid whose coverage misses the AOI has no candidates
    g = ChipGrid(CRS.from_epsg(32631), 10.0, 32, 0, (0.0, 0.0), aoi, coverage=shapely.box(1e6, 1e6, 1e6 + 1, 1e6 + 1))
    assert g.candidates.shape == (0, 2)


def test_chip_ids_with_an_origin_keep_every_digit_and_no_comma():
    aoi = shapely.box(0, 0, 1000, 1000)
    g = ChipGrid(CRS.from_epsg(32631), 10.0, 32, 0, (500000.123456789, -12.5), aoi)
    cid = g.chip_id(3, -4)
    assert cid == "EPSG32631_r10_c32_s32_o500000.123456789_-12.5_x3_y-4"
    assert "," not in cid and "e+" not in cid
    other = ChipGrid(CRS.from_epsg(32631), 10.0, 32, 0, (500000.12345679, -12.5), aoi)  # equal to 6 digits
    assert other.chip_id(3, -4) != cid
    # a fine resolution keeps its digits too; a plain grid keeps the ids it always had
    fine = ChipGrid(CRS.from_epsg(4326), 0.000089831528, 32, 0, (0.0, 0.0), aoi)
    assert fine.key == "EPSG4326_r0.000089831528_c32_s32"
    assert ChipGrid(CRS.from_epsg(32632), 10.0, 64, 0, (0.0, 0.0), aoi).chip_id(771, -7886) == \
        "EPSG32632_r10_c64_s64_x771_y-7886"


def test_utm_refusal_is_an_input_error_in_the_library(tmp_path):
    catalog = _three_zone_catalog(tmp_path / "lib", "intersection", "utm")
    with pytest.raises(InputError, match=r"spans UTM zones 29 \(EPSG:32629\), 30 \(EPSG:32630\), 31 \(EPSG:32631\)"):
        ingest(load_catalog(catalog), checksum=False)


def test_reading_inputs_caps_gdals_block_cache_at_64_mib_in_every_thread():
    """GDAL's default block cache is 5% of the machine's RAM (not a pod's limit), and GDAL has one
    limit per process. rasterio hands GDAL_CACHEMAX to GDAL as bytes (a bare 64 was 64 bytes: no
    cache), and an Env given it restores the old limit on exit, so threads leaving their Envs out of
    order undid each other's cap. Here thread A enters, then B, A leaves while B still reads."""
    import threading

    from rasterio.env import get_gdal_config

    from sarflow.data.ingest import GDAL_CACHE_BYTES, gdal_env

    entered, a_left = threading.Barrier(2), threading.Event()
    seen = {}

    def a():
        with gdal_env(["/data/a.tif"]):
            entered.wait()
        a_left.set()

    def b():
        with gdal_env(["/data/b.tif"]):
            entered.wait()
            a_left.wait()
            seen["b after a left"] = get_gdal_config("GDAL_CACHEMAX")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert GDAL_CACHE_BYTES == 64 << 20
    assert seen == {"b after a left": GDAL_CACHE_BYTES}
    assert get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_BYTES  # the process keeps the cap

"""data/screen.py: the plan's chips decided from the source pixels are exactly the chips that warping
every candidate block decides (the reference), on real rasters and on synthetic ones made to be hard
(holes, a nodata value inside the data range, other CRSs, up- and downsampling, per-band mosaics);
and the screening decides most chips without warping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin
from rasterio.windows import Window

from helpers import folder_bytes, write_catalog
from sarflow.data.catalog import load_catalog
from sarflow.data.ingest import gdal_env, ingest
from sarflow.data import screen
from sarflow.data.screen import UNKNOWN, screen_sources
from sarflow.data.tile import BlockRenderer, TileOptions, choose_resampling, plan_blocks
from sarflow.data.tile_units import block_side, kept_chips


def _screened_and_exact(catalog: Path, window_px: int = 256) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(kept by the plan, kept by warping every block, share of candidates decided without warping,
    that share per required source)."""
    ing = ingest(load_catalog(catalog), checksum=False)
    g = ing.grid
    with gdal_env([u for s in ing.sources for u in s.files]):
        resampling = {(s.name, u): choose_resampling(s, f, g) for s in ing.sources for u, f in s.files.items()}
    blocks = plan_blocks(g, block_side(g, TileOptions(window_px=window_px)))
    renderer = BlockRenderer(ing, resampling)
    try:
        fast = np.concatenate(kept_chips(renderer, ing, blocks, resampling, workers=2))
        exact = np.concatenate(kept_chips(renderer, ing, blocks, resampling, workers=2, screen=False))
    finally:
        renderer.close()
    positions = np.concatenate([b.chips for b in blocks])
    required = [s for s in ing.sources if s.spec.required]
    status = screen_sources(ing, required, resampling, positions)
    undecided = ~(status == 1).all(axis=0) & ~(status == 0).any(axis=0)
    per_source = {s.name: float((st != UNKNOWN).mean()) for s, st in zip(required, status)}
    return fast, exact, 1 - undecided.mean(), per_source


def _write(path: Path, data: np.ndarray, crs, transform, nodata=None) -> str:
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True,
                       blockxsize=64, blockysize=64) as ds:
        ds.write(data)
    return str(path)


def _holes(shape, rng, n=25, r=(2, 30)) -> np.ndarray:
    """True in a few discs and a diagonal swath edge: pixels to blank out."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    out = xx + 0.6 * yy > 1.3 * w  # a slanted data edge, like a swath border
    for _ in range(n):
        cy, cx, rad = rng.integers(0, h), rng.integers(0, w), rng.integers(*r)
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2
    return out


@pytest.fixture(scope="module")
def hard_scene(tmp_path_factory) -> Path:
    """Sources in EPSG:4326 and UTM, at 5, 8 and 30 m, with holes, a nodata value inside the data range,
    a categorical layer, a per-band mosaic and a source stored at 20 m, onto a 10 m UTM grid."""
    tmp = tmp_path_factory.mktemp("hard")
    rng = np.random.default_rng(3)
    # float dB in EPSG:4326 (~8 m), NaN holes
    geo = from_origin(9.000, 45.010, 0.0001, 0.00007)
    db = rng.normal(-12, 3, size=(2, 300, 260)).astype("float32")
    db[:, _holes(db.shape[1:], rng)] = np.nan
    s1 = _write(tmp / "s1.tif", db, "EPSG:4326", geo)
    # int16 in UTM at 30 m whose nodata (0) lies inside its data range (-40..40): bilinear upsampling
    utm = from_origin(500_000 - 300, 4_985_500 + 300, 30, 30)
    dem = rng.integers(-40, 41, size=(1, 90, 90)).astype("int16")
    dem[dem == 0] = 1
    dem[:, _holes(dem.shape[1:], rng, n=8, r=(1, 6))] = 0
    dem_path = _write(tmp / "dem.tif", dem, "EPSG:32632", utm, nodata=0)
    # uint8 classes at 5 m, nodata 255, downsampled by mode
    cls = rng.choice(np.array([10, 20, 30], "uint8"), size=(1, 520, 520))
    cls[:, _holes(cls.shape[1:], rng, n=30, r=(3, 40))] = 255
    cls_path = _write(tmp / "classes.tif", cls, "EPSG:32632", from_origin(500_000, 4_985_500, 5, 5), nodata=255)
    # three single-band files of one float source at 10 m, each with its own holes (a pixel is valid
    # only where all three are)
    bands = []
    for b in range(3):
        x = rng.normal(size=(1, 260, 260)).astype("float32")
        x[:, _holes(x.shape[1:], rng, n=10)] = np.nan
        bands.append(_write(tmp / f"b{b}.tif", x, "EPSG:32632", from_origin(500_000, 4_985_500, 10, 10)))
    # and a three-band file over part of it, laid over the stack (a mosaic)
    x = rng.normal(size=(3, 120, 140)).astype("float32")
    x[:, _holes(x.shape[1:], rng, n=6)] = np.nan
    over = _write(tmp / "over.tif", x, "EPSG:32632", from_origin(501_000, 4_984_900, 10, 10))
    aoi = tmp / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [[[9.002, 44.99], [9.028, 44.99], [9.028, 45.008],
                                                         [9.002, 45.008], [9.002, 44.99]]]}}]}))
    return write_catalog(tmp / "catalog.yaml", {"crs": 32632, "resolution": 10, "chip_size": 16, "aoi": str(aoi)}, [
        {"name": "s1", "uris": [s1], "bands": ["VV", "VH"], "units": "dB", "kind": "continuous"},
        {"name": "dem", "uris": [dem_path], "bands": ["z"], "units": "m", "kind": "continuous",
         "store_resolution": 20},  # stored (and screened) on a 20 m grid inside the 10 m chips
        {"name": "classes", "uris": [cls_path], "bands": ["class"], "units": "class", "kind": "categorical", "role": "input"},
        {"name": "optical", "uris": [bands, over], "bands": ["b1", "b2", "b3"], "units": "reflectance",
         "kind": "continuous"},
    ])


def test_hard_synthetic_sources_are_screened_exactly(hard_scene):
    fast, exact, _, per_source = _screened_and_exact(hard_scene, window_px=128)
    assert exact.sum() > 30 and (~exact).sum() > 10, (exact.sum(), len(exact))  # chips both ways
    np.testing.assert_array_equal(fast, exact)
    # a nodata value inside the data range leaves bilinear output undecidable from the pixels (dem);
    # the other sources are mostly decided
    assert per_source["dem"] < 0.5 and min(v for k, v in per_source.items() if k != "dem") > 0.6, per_source


def test_files_read_in_many_strips_screen_as_read_whole(hard_scene, monkeypatch):
    # every file's window cut into strips of one cell of rows (read in parallel threads, assembled in
    # row order): the same decisions, also with the exact check, as whole windows
    whole_fast, exact, _, whole = _screened_and_exact(hard_scene, window_px=128)
    monkeypatch.setattr(screen, "STRIP_BYTES", 1)
    s = ingest(load_catalog(hard_scene), checksum=False).sources[0]
    uri, f = next(iter(s.files.items()))
    strips = screen._strips(s, uri, f.count, Window(0, 0, f.width, f.height))
    assert len(strips) > 10 and {w.height for w in strips[:-1]} == {screen.CELL}
    # strips cut at the file's block rows too, so no block is decoded by two strips
    aligned = screen._strips(s, uri, f.count, Window(0, 16, f.width, 300), block_rows=64)
    assert [(w.row_off, w.height) for w in aligned] == [(16, 112), (128, 64), (192, 64), (256, 60)]
    fast, _, _, per_source = _screened_and_exact(hard_scene, window_px=128)
    np.testing.assert_array_equal(fast, whole_fast)
    np.testing.assert_array_equal(fast, exact)
    assert per_source == whole


def test_a_plan_screened_in_parts_keeps_what_one_part_keeps_and_hands_blocks_on_by_grid_number(
        hard_scene, tmp_path, monkeypatch):
    # the adversarial scene, its screening cut into parts (one screened by another step, the rest by
    # tile() resuming the survey, which warps undecided blocks and hands them to its units): the same
    # store as one tile() whose plan screened everything at once
    from sarflow.data import tile_units
    from sarflow.data.tile import tile
    from sarflow.data.tile_units import screen_part, survey

    options = TileOptions(window_px=128, shard_chips=16, unit_shards=1, workers=2)
    cat = load_catalog(hard_scene)
    one = tile(cat, tmp_path / "one.zarr", options, show_progress=False)
    out = tmp_path / "parts.zarr"
    s = survey(cat, out, options, 4)
    assert len(s.parts) >= 3
    screen_part(out, 0)
    offered, screening = [], []  # blocks the plan's screening offers (the units offer theirs too)
    real_offer, real_screen = tile_units.HANDOVER.offer, tile_units._screen

    def offer(key, layer):
        if screening:
            offered.append(key[1])
        return real_offer(key, layer)

    def screen_and_note(*args, **kwargs):
        screening.append(True)
        try:
            return real_screen(*args, **kwargs)
        finally:
            screening.pop()

    monkeypatch.setattr(tile_units.HANDOVER, "offer", offer)
    monkeypatch.setattr(tile_units, "_screen", screen_and_note)
    tile(cat, out, options, show_progress=False)
    assert offered and min(offered) >= s.parts[1][0]  # keyed by the grid's block number, not the part's
    assert folder_bytes(out) == folder_bytes(one)


@pytest.fixture(scope="module")
def salt_scene(tmp_path_factory) -> Path:
    """Sources that are nodata but for single valid pixels here and there (one for two chips): whether a
    chip holds a valid pixel then turns on pixels just outside its edge that the kernel reaches. On the
    grid's own pixels (UTM, 10 m, aligned with the chips), at 30 m (upsampled), at 2.5 m (averaged),
    in EPSG:4326, rotated by 12 degrees, and a dB source warped with cubic."""
    tmp = tmp_path_factory.mktemp("salt")
    rng = np.random.default_rng(11)
    uris = []
    for name, crs, transform, shape in [
        ("aligned", "EPSG:32632", from_origin(500_000, 4_985_500, 10, 10), (200, 200)),
        ("coarser", "EPSG:32632", from_origin(500_004, 4_985_497, 30, 30), (70, 70)),  # upsampled: reach beyond the chip
        ("finer", "EPSG:32632", from_origin(500_001, 4_985_499, 2.5, 2.5), (800, 800)),  # downsampled (average)
        ("geographic", "EPSG:4326", from_origin(9.0, 45.01, 0.00012, 0.00009), (230, 170)),
        ("rotated", "EPSG:32632", Affine.translation(500_000, 4_985_500) * Affine.rotation(12) * Affine.scale(9, -9),
         (230, 230)),
    ]:
        pixel = abs(transform.a) * (111_000 * 0.7 if crs == "EPSG:4326" else 1)
        density = 0.6 / max(1.0, (80 / pixel) ** 2)  # about one valid pixel for two 80 m chips
        x = np.full((1, *shape), np.nan, dtype="float32")
        hit = rng.random(shape) < density
        x[0][hit] = rng.normal(size=int(hit.sum()))
        uris.append((name, _write(tmp / f"{name}.tif", x, crs, transform)))
    catalogs = [write_catalog(tmp / f"{name}.yaml", {"crs": 32632, "resolution": 10, "chip_size": 8},
                              [{"name": name, "uris": [uri], "bands": ["v"], "units": "linear", "kind": "continuous"}])
                for name, uri in uris]
    # a kernel with negative lobes, on a dB source (interpolated power can go negative)
    catalogs.append(write_catalog(tmp / "cubic_db.yaml", {"crs": 32632, "resolution": 10, "chip_size": 8},
                                  [{"name": "db", "uris": [uris[1][1]], "bands": ["v"], "units": "dB",
                                    "kind": "continuous", "resampling": "cubic"}]))
    return catalogs


@pytest.mark.parametrize("cell", [8, 1])  # 1: no cell rounding, the kernel's reach alone decides
def test_sparse_single_pixels_are_screened_exactly(salt_scene, monkeypatch, cell):
    monkeypatch.setattr(screen, "CELL", cell)
    for catalog in salt_scene:
        fast, exact, _, _ = _screened_and_exact(catalog, window_px=64)
        assert exact.sum() > 20 and (~exact).sum() > 20, (catalog.name, exact.sum(), len(exact))
        np.testing.assert_array_equal(fast, exact, err_msg=catalog.name)


def test_sen1floods11_spain_is_screened_exactly(real_data, tmp_path):
    d = real_data / "sen1floods11"
    catalog = write_catalog(tmp_path / "catalog.yaml", {"crs": "utm", "resolution": 10, "chip_size": 32}, [
        {"name": "s1", "uris": [str(d / "Spain_7370579_S1Hand.tif")], "bands": ["VV", "VH"], "units": "dB",
         "kind": "continuous"},
        {"name": "s2", "uris": [str(d / "Spain_7370579_S2Hand.tif")], "bands": [f"B{i}" for i in range(13)],
         "units": "reflectance", "kind": "continuous"},
        {"name": "water", "uris": [str(d / "Spain_7370579_LabelHand.tif")], "bands": ["water"], "units": "class",
         "kind": "categorical", "nodata": -1, "role": "input"},
    ])
    fast, exact, decided, _ = _screened_and_exact(catalog)
    np.testing.assert_array_equal(fast, exact)
    assert exact.sum() > 100 and decided > 0.8, (exact.sum(), decided)


@pytest.mark.parametrize("resolution", [40, 250])  # upsampled (nearest) and downsampled (mode)
def test_corine_lausanne_is_screened_exactly(real_data, tmp_path, resolution):
    d = real_data / "corine-lausanne"
    catalog = write_catalog(tmp_path / "catalog.yaml", {"crs": 2056, "resolution": resolution, "chip_size": 16}, [
        {"name": "clc06", "uris": [str(d / "ls100_06.tif")], "bands": ["code"], "units": "class",
         "kind": "categorical", "role": "input"},
        {"name": "clc12", "uris": [str(d / "ls250_12.tif")], "bands": ["code"], "units": "class",
         "kind": "categorical", "role": "input"},
    ])
    fast, exact, decided, _ = _screened_and_exact(catalog)
    np.testing.assert_array_equal(fast, exact)
    assert exact.sum() > 5 and decided > 0.5, (exact.sum(), decided)


@pytest.mark.parametrize("shape", [(64, 64), (61, 45), (7, 13), (1, 1)])
@pytest.mark.parametrize("how", ["any", "all"])
def test_validity_cells_pool_by_words_equal_numpy_reductions(shape, how):
    """`_pool` reads a cell row's 8 booleans as one 64-bit word: the same cells as numpy's any()/all()
    over each 8 x 8 cell of the mask padded with False, for masks that are empty, full, sparse or
    dense, whole cells or not, C or Fortran ordered."""
    from sarflow.data.screen import CELL, _pool

    rng = np.random.default_rng(5)
    reduce = getattr(np, how)
    for p in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) >= p
        h, w = shape
        padded = np.pad(mask, ((0, -h % CELL), (0, -w % CELL)))
        want = reduce(reduce(padded.reshape(padded.shape[0] // CELL, CELL, padded.shape[1] // CELL, CELL), axis=3),
                      axis=1)
        for m in (mask, np.asfortranarray(mask)):
            got = _pool(m, reduce)
            assert got.dtype == bool and got.shape == want.shape
            np.testing.assert_array_equal(got, want)

"""Coarse sources stored coarse (catalog `store_resolution`): warped straight onto the chip's coarse
grid (checked against the gdalwarp CLI), upsampled by the one reader (nearest), refused when the
resolution does not divide the chip, and leaving the rest of the store byte for byte as it was.

The scene is hand-made (UTM 32N, 10 m grid, 32 px chips): a 10 m input at full resolution and, stored
at 40 m (k = 4), a 30 m coherence (averaged), a 30 m backscatter in dB (averaged in linear power)
and a 20 m categorical label with nodata (mode). The coarse sources cover more than the chips, and
the label's nodata and classes come in 40 m blocks (each with a clear majority), so the chips'
valid fractions are the same at 10 m and at 40 m: `chips.parquet` can be compared byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
import zarr
from affine import Affine

from helpers import chip_windows, gdalwarp_reference, write_catalog
from sarflow.data.catalog import load_catalog
from sarflow.data.chipstore import chip, iter_masked, open_store_xarray, read_masked
from sarflow.data.tile import TileOptions, tile
from sarflow.errors import CatalogError

CRS = "EPSG:32632"
X0, Y0 = 499_840.0, 5_000_000.0  # a chip corner of the grid (multiples of 320 m)
SIDE = 2560.0  # metres of the 10 m input: 8 x 8 chips
MARGIN = 640.0  # the coarse sources reach this far beyond the chips
K, COARSE = 4, 40.0
COARSE_SOURCES = ("coh", "sigma", "lc")
LC_NODATA = 0


def _write(path: Path, data: np.ndarray, res: float, x0: float, y0: float, nodata) -> str:
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype, "crs": CRS, "transform": Affine(res, 0, x0, 0, -res, y0), "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return str(path)


def _smooth(rng, shape, lo, hi):
    from scipy import ndimage

    z = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    z = (z - z.min()) / (z.max() - z.min())
    return (lo + (hi - lo) * z + rng.normal(0, 0.02 * (hi - lo), shape)).astype(np.float32)


def _scene(folder: Path) -> dict:
    rng = np.random.default_rng(11)
    n10 = int(SIDE / 10)
    files = {"amp": _write(folder / "amp.tif", _smooth(rng, (1, n10, n10), 0.0, 1.0), 10, X0, Y0, None)}
    x0, y0 = X0 - MARGIN, Y0 + MARGIN
    n30 = int((SIDE + 2 * MARGIN) / 30) + 1
    files["coh"] = _write(folder / "coh.tif", _smooth(rng, (2, n30, n30), 0.05, 0.95), 30, x0, y0, None)
    files["sigma"] = _write(folder / "sigma.tif", _smooth(rng, (2, n30, n30), -25.0, -3.0), 30, x0, y0, None)
    n40 = int((SIDE + 2 * MARGIN) / 40)
    blocks = rng.integers(1, 4, size=(n40, n40)).astype(np.uint8)
    blocks[rng.random((n40, n40)) < 0.08] = LC_NODATA  # nodata in whole 40 m cells
    lc = np.kron(blocks, np.ones((2, 2), np.uint8))  # 20 m pixels, a 40 m cell's four share its class ...
    minority = (blocks > 0) & (rng.random((n40, n40)) < 0.3)
    r, c = np.nonzero(minority)
    lc[2 * r, 2 * c] = blocks[r, c] % 3 + 1  # ... but one in three cells has one other class: a clear majority
    files["lc"] = _write(folder / "lc.tif", lc[None], 20, x0, y0, LC_NODATA)
    return files


def _sources(files: dict, coarse: bool) -> list[dict]:
    store = {"store_resolution": COARSE} if coarse else {}
    return [
        {"name": "amp", "uris": [files["amp"]], "bands": ["amp"], "units": "linear", "kind": "continuous"},
        {"name": "coh", "uris": [files["coh"]], "bands": ["c12", "c24"], "units": "coherence", "kind": "continuous",
         "required": False, **store},
        {"name": "sigma", "uris": [files["sigma"]], "bands": ["VV", "VH"], "units": "dB", "kind": "continuous",
         "required": False, **store},
        {"name": "lc", "uris": [files["lc"]], "bands": ["class"], "units": "class", "kind": "categorical",
         "nodata": LC_NODATA, "classes": {1: "a", 2: "b", 3: "c"}, "required": False, **store},
    ]


GRID = {"crs": 32632, "resolution": 10, "chip_size": 32, "aoi": "intersection"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coarse")
    files = _scene(tmp)
    out = {}
    for coarse in (False, True):
        name = "coarse" if coarse else "full"
        cat = write_catalog(tmp / f"{name}.yaml", GRID, _sources(files, coarse))
        out[name] = tile(load_catalog(cat), tmp / f"{name}.zarr", TileOptions(shard_chips=16, workers=1),
                         show_progress=False)
    out["files"] = files
    return out


def _linear_power(src: str, folder: Path) -> str:
    with rasterio.open(src) as ds:
        data, profile = ds.read().astype(np.float64), ds.profile
    profile.update(dtype="float64", nodata=float("nan"))
    folder.mkdir(exist_ok=True)
    with rasterio.open(folder / Path(src).name, "w", **profile) as dst:
        dst.write(10 ** (data / 10))
    return str(folder / Path(src).name)


def test_coarse_arrays_equal_gdalwarp_on_the_coarse_grid(stores, gdalwarp, tmp_path):
    g = zarr.open_group(str(stores["coarse"]), mode="r")
    table = gpd.read_parquet(stores["coarse"] / "chips.parquet")
    extent, rows, cols = chip_windows(table, 10)
    n = 32 // K
    expected = {"coh": "average", "sigma": "average", "lc": "mode"}  # the rule judged at 40 m: downsampling
    for name in COARSE_SOURCES:
        arr = g[name]
        assert arr.shape == (len(table), len(arr.attrs["bands"]), n, n)
        assert arr.attrs["store_factor"] == K and arr.attrs["store_resolution"] == COARSE
        assert set(arr.attrs["resampling"].values()) == {expected[name]}
        src = stores["files"][name]
        if name == "sigma":  # dB: resampled in linear power, back to dB
            assert arr.attrs["resampling_domain"] == "linear_power"
            ref = gdalwarp_reference(_linear_power(src, tmp_path / "linear"), tmp_path / f"{name}.tif", CRS, COARSE,
                                     extent, "average", dst_nodata="nan")
            ref = (10 * np.log10(ref)).astype(np.float32)
        elif name == "lc":
            ref = gdalwarp_reference(src, tmp_path / f"{name}.tif", CRS, COARSE, extent, "mode",
                                     src_nodata=LC_NODATA, dst_nodata=LC_NODATA)
        else:
            ref = gdalwarp_reference(src, tmp_path / f"{name}.tif", CRS, COARSE, extent, "average", dst_nodata="nan")
        ours = arr[:]
        assert ours.dtype == ref.dtype
        for i, (r, c) in enumerate(zip(rows, cols)):
            assert r % K == 0 and c % K == 0
            theirs = ref[:, r // K:r // K + n, c // K:c // K + n]
            if name == "lc":
                np.testing.assert_array_equal(ours[i], theirs, err_msg=f"{name} chip {i}")
            else:
                np.testing.assert_allclose(ours[i], theirs, rtol=1e-4, atol=1e-4, err_msg=f"{name} chip {i}")
        if name == "lc":
            assert (ours == LC_NODATA).any() and (ours != LC_NODATA).any()  # the mask below has both


def test_reader_upsamples_coarse_arrays_by_repeating_pixels(stores):
    g = zarr.open_group(str(stores["coarse"]), mode="r")
    for name in COARSE_SOURCES:
        arr = g[name]
        raw = arr[:]
        stored = raw.astype(np.float32)
        if arr.attrs["nodata_in_store"] != "NaN":
            stored[raw == arr.attrs["nodata_in_store"]] = np.nan
        expected = np.repeat(np.repeat(stored, K, axis=2), K, axis=3)
        got = read_masked(arr)
        assert got.shape == (arr.shape[0], arr.shape[1], 32, 32)
        np.testing.assert_array_equal(got, expected)  # NaN where expected is NaN: the mask repeats with the values
        np.testing.assert_array_equal(read_masked(arr, 5), expected[5])
        np.testing.assert_array_equal(read_masked(arr, [2, 7], bands=[0]), expected[[2, 7]][:, [0]])
        parts = np.concatenate([chips for _, chips in iter_masked(arr)])
        np.testing.assert_array_equal(parts, expected)
    lc = read_masked(g["lc"])
    assert np.isnan(lc).any() and not np.isnan(lc).all()
    from sarflow.data.chipstore import chip_shape, open_store

    assert chip_shape(g["coh"]) == (g["coh"].shape[0], 2, 32, 32) and chip_shape(g["amp"]) == g["amp"].shape
    summary = open_store(stores["coarse"]).summary()["modalities"]  # `sarflow info --json`
    assert summary["coh"]["store_resolution"] == COARSE and "store_resolution" not in summary["amp"]


def test_xarray_sees_coarse_arrays_on_their_own_grid_and_chips_on_the_chip_grid(stores):
    store = stores["coarse"]
    g = zarr.open_group(str(store), mode="r")
    table = gpd.read_parquet(store / "chips.parquet").sort_values("index")
    ds = open_store_xarray(store)
    assert ds["coh"].dims == ("chip", "coh_band", "y_k4", "x_k4") and ds["amp"].dims[2:] == ("y", "x")
    centres = (np.arange(32 // K) + 0.5) * COARSE
    np.testing.assert_allclose(ds["chip_x_k4"].values, table["minx"].to_numpy()[:, None] + centres)
    np.testing.assert_allclose(ds["chip_y_k4"].values, table["maxy"].to_numpy()[:, None] - centres)
    one = chip(ds, 3)
    np.testing.assert_array_equal(one["coh"].values, read_masked(g["coh"], 3))
    np.testing.assert_array_equal(one["lc"].values, read_masked(g["lc"], 3))
    assert one["coh"].dims == ("coh_band", "y", "x") and one["coh"].x.size == 32
    raw = chip(ds, 3, masked=False)["lc"].values
    np.testing.assert_array_equal(raw, np.repeat(np.repeat(g["lc"][3], K, axis=1), K, axis=2))


def test_the_rest_of_the_store_is_byte_identical(stores):
    full, coarse = stores["full"], stores["coarse"]
    assert (full / "chips.parquet").read_bytes() == (coarse / "chips.parquet").read_bytes()
    g = zarr.open_group(str(coarse), mode="r")
    same = ["amp", "chip_x", "chip_y", "spatial_ref"]
    compared = 0
    for folder in same:
        files = sorted(p.relative_to(full) for p in (full / folder).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(coarse) for p in (coarse / folder).rglob("*") if p.is_file())
        for rel in files:
            assert (full / rel).read_bytes() == (coarse / rel).read_bytes(), rel
            compared += 1
    assert compared > 4
    for name in COARSE_SOURCES:  # the coarse arrays, 16 times fewer pixels
        assert zarr.open_group(str(full), mode="r")[name].shape[2:] == (32, 32) and g[name].shape[2:] == (8, 8)
    from sarflow.data.integrity import load_record, verify

    assert verify(coarse, full=True) == []  # the integrity record holds the coarse arrays' shards as written
    recorded = load_record(coarse)["files"]
    assert any(k.startswith("coh/") for k in recorded) and any(k.startswith("chip_x_k4/") for k in recorded)


@pytest.mark.parametrize("value, grid, allowed", [
    (35, {}, "allowed 10, 20, 40, 80, 160, 320"),  # not a whole multiple of 10
    (30, {}, "allowed 10, 20, 40, 80, 160, 320"),  # 3 does not divide 32
    (50, {"overlap": 8, "chip_size": 40}, "chip_size 40 and the stride 32: allowed 10, 20, 40, 80"),  # 5: not 32
])
def test_a_bad_store_resolution_is_refused_and_nothing_is_written(stores, tmp_path, value, grid, allowed):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    sources = _sources(stores["files"], coarse=False)
    sources[1]["store_resolution"] = value
    cat = write_catalog(tmp_path / "catalog.yaml", {**GRID, **grid}, sources)
    with pytest.raises(CatalogError) as e:
        load_catalog(cat)
    msg = str(e.value)
    assert "\n" not in msg and str(cat) in msg and "'coh'" in msg and f"store_resolution {value}" in msg, msg
    assert allowed in msg, msg
    out = tmp_path / "out" / "store.zarr"
    res = CliRunner().invoke(app, ["tile", str(cat), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "store_resolution" in res.output, res.output
    assert not (tmp_path / "out").exists()  # no store, no .partial, no lock, not even the folder


def test_catalogs_without_the_key_keep_their_hash(stores, tmp_path):
    import hashlib
    import json

    cat = load_catalog(write_catalog(tmp_path / "c.yaml", GRID, _sources(stores["files"], coarse=False))).catalog
    data = cat.model_dump(mode="json")
    for s in data["sources"]:
        assert s.pop("store_resolution") is None
    assert cat.hash() == hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    coarse = load_catalog(write_catalog(tmp_path / "k.yaml", GRID, _sources(stores["files"], coarse=True))).catalog
    assert coarse.hash() != cat.hash()
    assert yaml.safe_load((tmp_path / "k.yaml").read_text())["sources"][1]["store_resolution"] == COARSE
    # the grid's own resolution (k = 1) is the same store as no key: the same catalog hash
    own = [{**s, "store_resolution": float(GRID["resolution"])} for s in _sources(stores["files"], coarse=False)]
    assert load_catalog(write_catalog(tmp_path / "own.yaml", GRID, own)).catalog.hash() == cat.hash()


def test_every_consumer_sees_coarse_arrays_at_chip_size(stores, tmp_path):
    """The stages that size their buffers from an array (pixel baselines, label features, the SSL
    monitor, LLP's pixels, the embedding reader, export) get chip-sized values equal to the reader's."""
    import rasterio

    from sarflow.data.chip_labels import label_features
    from sarflow.data.export import export_chips
    from sarflow.downstream.baselines import chip_tensor
    from sarflow.downstream.llp.data import store_pixels, store_truth
    from sarflow.features.embed import _batch_tensor
    from sarflow.training.monitor import chip_classes

    store = str(stores["coarse"])
    g = zarr.open_group(store, mode="r")
    n = int(g.attrs["chips"])
    coh, lc = read_masked(g["coh"]), read_masked(g["lc"])[:, 0]
    x = chip_tensor(store, ["amp", "coh"])  # full- and coarse-resolution inputs side by side
    assert x.shape == (n, 3, 32, 32)
    assert np.isfinite(x).all() and (x[:, 1:][np.isnan(coh)] == 0).all()  # nodata filled with the mean (0 once z-scored)
    labelled = (~np.isnan(lc)).mean(axis=(1, 2))
    np.testing.assert_allclose(label_features(store)["lc__labelled"], labelled)
    full = label_features(str(stores["full"]))["lc__labelled"]  # 40 m nodata cells: the same fractions at 10 m
    np.testing.assert_allclose(label_features(store)["lc__labelled"], full)
    rows = np.arange(0, n, 3)
    majority = [np.bincount(c[~np.isnan(c)].astype(int), minlength=4).argmax() if (~np.isnan(c)).any() else -1
                for c in lc[rows]]
    np.testing.assert_array_equal(chip_classes(store, rows)["lc"], majority)
    raw = store_pixels(g, ["coh"], n)[0]
    np.testing.assert_array_equal(raw, coh)
    truth = store_truth(g["lc"], [1, 2, 3], n)
    np.testing.assert_array_equal(truth, np.where(np.isnan(lc), -1, np.nan_to_num(lc) - 1).astype(np.int64))
    batch = _batch_tensor([(g["amp"], [0]), (g["coh"], [0, 1])], 2, 6).numpy()
    np.testing.assert_array_equal(batch[:, 1:], coh[2:6])
    (cog,) = export_chips(store, "coh", tmp_path / "cogs", chips=[0])
    with rasterio.open(cog) as src:
        assert (src.width, src.height) == (32, 32) and src.res == (10.0, 10.0)
        np.testing.assert_array_equal(src.read(), coh[0])

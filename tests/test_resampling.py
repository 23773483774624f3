"""dB sources are resampled in linear power (multilooking), against an independent numpy
reference: expected = 10*log10(mean of 10**(x/10)) over each block of source pixels."""

from __future__ import annotations

import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from helpers import write_catalog
from sarflow.data import tile as tile_module
from sarflow.data.catalog import load_catalog
from sarflow.data.tile import TileOptions, tile

CRS = "EPSG:32630"
X0, Y0 = 1562 * 320.0, 13125 * 320.0  # on the chip grid of 40 m x 8 px, 20 m x 8 px and 5 m x 16 px chips
SIZE = 128  # source pixels of 10 m


def _write(path, data: np.ndarray, nodata=float("nan")) -> str:
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(data), dtype="float32",
                       crs=CRS, transform=from_origin(X0, Y0, 10, 10), nodata=nodata) as ds:
        ds.write(data.astype(np.float32))
    return str(path)


def _speckle(seed=3, looks=1) -> np.ndarray:
    """Backscatter in dB: a smooth mean power under gamma speckle of `looks` looks, a few holes (NaN)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    mean_db = -12.0 + 4.0 * np.sin(3 * xx) * np.cos(2 * yy)
    power = 10 ** (mean_db / 10) * rng.gamma(looks, 1.0 / looks, (SIZE, SIZE))
    db = 10 * np.log10(power)
    db[rng.random((SIZE, SIZE)) < 0.05] = np.nan
    db[40:52, 72:90] = np.nan  # a hole wider than a 40 m block
    return db.astype(np.float32)


def _tile(tmp_path, name, sources, res, chip, **over):
    cat = write_catalog(tmp_path / f"{name}.yaml", {"crs": 32630, "resolution": res, "chip_size": chip}, sources)
    return tile(load_catalog(cat), tmp_path / f"{name}.zarr", TileOptions(**over), show_progress=False)


def _source(name, path, units="dB", **over):
    return {"name": name, "uris": [path], "bands": ["b"], "units": units, "kind": "continuous", **over}


def _mosaic(store, name, res) -> np.ndarray:
    """The store's chips laid back on the source extent (NaN where no chip was kept)."""
    arr = zarr.open_group(str(store), mode="r")[name]
    table = gpd.read_parquet(store / "chips.parquet")
    n = int(round(SIZE * 10 / res))
    out = np.full((arr.shape[1], n, n), np.nan)
    chip = arr.shape[-1]
    for i, minx, maxy in zip(table["index"], table["minx"], table["maxy"]):
        r, c = int(round((Y0 - maxy) / res)), int(round((minx - X0) / res))
        if 0 <= r < n and 0 <= c < n:
            out[:, r:r + chip, c:c + chip] = arr[int(i)][:, :n - r, :n - c]
    return out


def _blocks(db: np.ndarray, k: int, linear: bool) -> np.ndarray:
    """The independent reference: mean over k x k blocks of valid pixels, in power or in dB."""
    x = db.astype(np.float64).reshape(SIZE // k, k, SIZE // k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block stays NaN
        if linear:
            return 10 * np.log10(np.nanmean(10 ** (x / 10), axis=(1, 3)))
        return np.nanmean(x, axis=(1, 3))


@pytest.mark.parametrize("res", [20, 40])
def test_db_is_block_averaged_in_linear_power(tmp_path, res):
    db = _speckle()
    holes = np.where(np.isnan(db), -9999.0, db)
    store = _tile(tmp_path, "s", [_source("sar", _write(tmp_path / "sar.tif", db)),
                                  _source("sarnd", _write(tmp_path / "sarnd.tif", holes, nodata=-9999.0), nodata=-9999),
                                  _source("plain", _write(tmp_path / "plain.tif", db), units="linear")], res, 8)
    g = zarr.open_group(str(store), mode="r")
    assert set(g["sar"].attrs["resampling"].values()) == {"average"}
    assert g["sar"].attrs["resampling_domain"] == g["sarnd"].attrs["resampling_domain"] == "linear_power"
    assert g["plain"].attrs["resampling_domain"] == "native"
    expected = _blocks(db, res // 10, linear=True)
    for name in ("sar", "sarnd"):  # NaN holes and a nodata value are excluded alike
        ours = _mosaic(store, name, res)[0]
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4, err_msg=name)
    # a source in other units is averaged as it is
    np.testing.assert_allclose(_mosaic(store, "plain", res)[0], _blocks(db, res // 10, linear=False), atol=1e-4)


def test_constant_db_field_stays_constant_averaged_and_upsampled(tmp_path):
    db = np.full((SIZE, SIZE), -13.7, np.float32)
    db[10:20, 30:33] = np.nan
    src = _write(tmp_path / "const.tif", db)
    for res, chip, method in ((40, 8, "average"), (5, 16, "bilinear")):
        store = _tile(tmp_path, f"c{res}", [_source("sar", src)], res, chip)
        a = zarr.open_group(str(store), mode="r")["sar"]
        assert set(a.attrs["resampling"].values()) == {method}
        values = a[:][~np.isnan(a[:])]
        assert values.size > 1000
        np.testing.assert_allclose(values, np.float32(-13.7), rtol=0, atol=1e-5)


def test_bilinear_upsampling_interpolates_power(tmp_path):
    db = _speckle(seed=5)
    db[:] = np.where(np.isnan(db), -15.0, db)  # no holes: the kernel is the plain 2 x 2 one
    store = _tile(tmp_path, "up", [_source("sar", _write(tmp_path / "sar.tif", db))], 5, 16)
    ours = _mosaic(store, "sar", 5)[0]
    # 5 m pixel centres sit a quarter of a source pixel from the nearest 10 m centre: weights 3/4, 1/4
    p = 10 ** (db.astype(np.float64) / 10)
    rows = 0.75 * p[1:-1] + 0.25 * p[:-2]  # the upper 5 m row of source row i (i = 1..SIZE-2)
    up = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, :-2]  # the left 5 m column of source column j
    expected = 10 * np.log10(up)
    np.testing.assert_allclose(ours[2:-2:2, 2:-2:2], expected, rtol=0, atol=1e-4)


def test_the_bias_of_averaging_db_is_gone_and_nodata_stays_as_before(tmp_path, monkeypatch):
    db = np.stack([_speckle(seed=1), _speckle(seed=2)])  # single-look speckle, two bands with their own holes
    src = _write(tmp_path / "sar.tif", db)
    source = {**_source("sar", src), "bands": ["vv", "vh"]}
    store = _tile(tmp_path, "now", [source], 40, 8)
    ours = _mosaic(store, "sar", 40)
    with monkeypatch.context() as m:  # the previous behaviour: dB averaged as it is
        m.setattr(tile_module, "resampling_domain", lambda s: "native")
        before_store = _tile(tmp_path, "before", [source], 40, 8)
    assert zarr.open_group(str(before_store), mode="r")["sar"].attrs["resampling_domain"] == "native"
    before = _mosaic(before_store, "sar", 40)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(before))  # the same pixels are nodata as before
    ok = ~np.isnan(ours)
    assert ok.sum() > 800  # (a multi-band file: GDAL drops a block with any hole, in both domains alike)
    linear = np.stack([_blocks(b, 4, linear=True) for b in db])
    plain = np.stack([_blocks(b, 4, linear=False) for b in db])
    np.testing.assert_allclose(ours[ok], linear[ok], atol=1e-4)
    np.testing.assert_allclose(before[ok], plain[ok], atol=1e-4)
    bias_now, bias_before = float(np.mean(ours[ok] - linear[ok])), float(np.mean(before[ok] - linear[ok]))
    print(f"mean bias against the linear-power mean at 16 looks: now {bias_now:+.4f} dB, dB averaging {bias_before:+.4f} dB")
    assert abs(bias_now) < 1e-4
    assert bias_before < -1.5  # single-look speckle averaged in dB: about -2 dB

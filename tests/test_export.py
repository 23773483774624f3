"""Chips on a map: a chip opened as a georeferenced DataArray (read by rioxarray), and `sarflow export` writing
Cloud-Optimized GeoTIFFs (read by gdalinfo and rasterio) of single chips and of a mosaic."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from sarflow.data.chipstore import open_chip_xarray, open_store, read_masked
from sarflow.errors import InputError


@pytest.fixture(scope="module")
def store(tiny_store):
    return open_store(tiny_store)


def _expected_transform(store, rec):
    res = float(store.attrs["resolution"])
    return (res, 0.0, float(rec["minx"]), 0.0, -res, float(rec["maxy"]))


def _adjacent_pair(store):
    """Two chips side by side (same row of the grid, the second one chip east of the first)."""
    t = store.chips
    for _, a in t.iterrows():
        b = t[(t["iy"] == a["iy"]) & (t["ix"] == a["ix"] + 1)]
        if len(b):
            return a, b.iloc[0]
    pytest.fail("the tiny store has no two horizontally adjacent chips")


def _gdalinfo(path) -> dict:
    exe = shutil.which("gdalinfo")
    if not exe:
        pytest.skip("gdalinfo not installed (Debian gdal-bin)")
    return json.loads(subprocess.run([exe, "-json", str(path)], check=True, capture_output=True, text=True).stdout)


@pytest.mark.parametrize("modality", ["s1grd", "worldcover"])
def test_chip_as_dataarray_is_georeferenced_for_rioxarray(store, modality):
    rioxarray = pytest.importorskip("rioxarray")  # noqa: F841 (registers the .rio accessor)
    from rasterio.crs import CRS

    rec = store.chips.iloc[5]
    da = open_chip_xarray(store, modality, rec["chip_id"])
    assert da.dims == ("band", "y", "x")
    assert list(da.band.values) == list(store.array(modality).attrs["bands"])
    np.testing.assert_array_equal(da.values, read_masked(store.array(modality), int(rec["index"])))
    assert da.rio.crs == CRS.from_user_input(store.attrs["crs"])
    assert tuple(da.rio.transform())[:6] == pytest.approx(_expected_transform(store, rec))
    assert da.rio.bounds() == pytest.approx((rec["minx"], rec["miny"], rec["maxx"], rec["maxy"]))
    # the CF grid mapping is what rioxarray itself writes for the store's CRS
    ref = da.drop_vars("spatial_ref").rio.write_crs(store.attrs["crs_wkt"])
    theirs = dict(ref.spatial_ref.attrs)
    ours = {k: v for k, v in da.spatial_ref.attrs.items() if k != "GeoTransform"}
    assert ours == theirs
    assert da.encoding["grid_mapping"] == "spatial_ref"
    # a row index opens the same chip
    assert open_chip_xarray(store, modality, int(rec["index"])).attrs["chip_id"] == rec["chip_id"]


def test_chip_as_dataarray_pixel_centres_without_rioxarray(store):
    rec = store.chips.iloc[0]
    res = float(store.attrs["resolution"])
    da = open_chip_xarray(store, "dem", rec["chip_id"])
    assert da.x.values[0] == pytest.approx(rec["minx"] + res / 2)
    assert da.y.values[0] == pytest.approx(rec["maxy"] - res / 2)
    assert da.x.values[-1] == pytest.approx(rec["maxx"] - res / 2)
    assert da.y.values[-1] == pytest.approx(rec["miny"] + res / 2)
    assert da.spatial_ref.attrs["grid_mapping_name"] == "transverse_mercator"


def test_chip_as_dataarray_refuses_unknown_modality_and_chip(store):
    with pytest.raises(InputError, match="no modality 'nope'") as e:
        open_chip_xarray(store, "nope", 0)
    assert str(store.path) in str(e.value)
    with pytest.raises(InputError, match="no chip id 'no-such-chip'") as e:
        open_chip_xarray(store, "dem", "no-such-chip")
    assert str(store.path) in str(e.value)


def _read_back(path):
    import rasterio

    with rasterio.open(path) as src:
        data = src.read()
        nodata = src.nodata
        return src, data, nodata


@pytest.mark.parametrize("modality,dtype,nodata", [("s1grd", "float32", None), ("worldcover", "uint8", 0),
                                                   ("vegetation", "uint8", 255)])
def test_export_chip_is_a_cog_gdal_and_rasterio_read(store, tmp_path, modality, dtype, nodata):
    from rasterio.crs import CRS

    from sarflow.data.export import export_chips

    rec = store.chips.iloc[7]
    [path] = export_chips(store, modality, tmp_path, chips=[rec["chip_id"]])
    assert path.name == f"{modality}_{rec['chip_id']}.tif"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left

    info = _gdalinfo(path)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert info["geoTransform"] == pytest.approx([rec["minx"], 10.0, 0.0, rec["maxy"], 0.0, -10.0])
    assert CRS.from_wkt(info["coordinateSystem"]["wkt"]) == CRS.from_user_input(store.attrs["crs"])
    assert [b["description"] for b in info["bands"]] == list(store.array(modality).attrs["bands"])

    src, data, nd = _read_back(path)
    assert data.dtype == np.dtype(dtype)
    expected = read_masked(store.array(modality), int(rec["index"]))
    if nodata is None:
        assert np.isnan(nd)
        got = data
    else:
        assert nd == nodata
        got = np.where(data == nodata, np.nan, data.astype(np.float32))
    np.testing.assert_array_equal(got, expected)


def test_export_label_masks_out_of_range_with_declared_nodata(store, tmp_path):
    """An integer label keeps its dtype; a pixel the one reader masks (here: forced out of the declared range) is
    written as the declared nodata, not as its raw value."""
    from sarflow.data.export import _encode, _encoding

    arr = store.array("vegetation")
    raw = arr[0].copy()
    raw[0, 0, 0] = 200  # outside the declared range [0, 100]
    out, valid = _encode(arr, raw, _encoding(store, "vegetation"))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and not valid[0, 0, 0]


def test_mosaic_of_two_adjacent_chips_is_them_side_by_side(store, tmp_path):
    from sarflow.data.export import export_chips

    a, b = _adjacent_pair(store)
    for modality in ("s1coh", "worldcover"):
        [path] = export_chips(store, modality, tmp_path, chips=[a["chip_id"], b["chip_id"]], mosaic=True)
        assert path.name == f"{modality}_mosaic.tif"
        info = _gdalinfo(path)
        assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
        assert info["geoTransform"] == pytest.approx([a["minx"], 10.0, 0.0, a["maxy"], 0.0, -10.0])
        src, data, nd = _read_back(path)
        arr = store.array(modality)
        expected = np.concatenate([read_masked(arr, int(a["index"])), read_masked(arr, int(b["index"]))], axis=2)
        got = data if np.isnan(nd) else np.where(data == nd, np.nan, data.astype(np.float32))
        assert data.dtype == arr.dtype
        np.testing.assert_array_equal(got, expected)


def test_mosaic_leaves_uncovered_pixels_nodata(store, tmp_path):
    """Two chips on a diagonal: the mosaic covers their bounding box, the two other cells are nodata."""
    from sarflow.data.export import export_chips

    t = store.chips
    a = t.iloc[0]
    b = t[(t["ix"] == a["ix"] + 1) & (t["iy"] == a["iy"] + 1)].iloc[0]
    [path] = export_chips(store, "worldcover", tmp_path, chips=[a["chip_id"], b["chip_id"]], mosaic=True)
    _, data, nd = _read_back(path)
    assert data.shape[1:] == (64, 64)
    # iy grows northward here when b's maxy is above a's; whichever way, two quadrants are all nodata
    quads = [data[:, :32, :32], data[:, :32, 32:], data[:, 32:, :32], data[:, 32:, 32:]]
    assert sum(bool((q == nd).all()) for q in quads) == 2


def test_cli_export_split_and_errors(tiny_store, store, tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    out = tmp_path / "cogs"
    res = CliRunner().invoke(app, ["export", str(tiny_store), "--modality", "dem", "--out", str(out), "--split", "test"])
    assert res.exit_code == 0, res.output
    test_ids = store.chips.loc[store.chips["split"] == "test", "chip_id"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"dem_{c}.tif" for c in test_ids)

    bad = tmp_path / "bad"
    for args, cause in ((["--modality", "nope", "--all"], "no modality 'nope'"),
                        (["--modality", "dem", "--chips", "nope"], "no chip id 'nope'"),
                        (["--modality", "dem"], "choose exactly one")):
        res = CliRunner().invoke(app, ["export", str(tiny_store), "--out", str(bad), *args])
        assert res.exit_code == 2, res.output
        assert str(tiny_store) in res.output and cause in res.output
    assert not bad.exists() or not any(bad.iterdir())


def test_chip_pixels_mosaic_is_a_categorical_cog(store, tmp_path):
    """Per-pixel class codes of chips (a segmentation's predictions) as one COG mosaic: gdalinfo sees a COG on the
    store's grid with the classes' palette; rasterio reads back the values, nodata where no chip lies."""
    from rasterio.crs import CRS

    from sarflow.data.export import export_chip_pixels

    a, b = _adjacent_pair(store)
    classes = list(store.array("worldcover").attrs["classes"])[:3]
    codes = np.array([c["code"] for c in classes], dtype=np.uint8)
    rng = np.random.default_rng(3)
    values = codes[rng.integers(0, 3, (2, 32, 32))]
    values[1, :5, :7] = 0  # no prediction
    path = export_chip_pixels(store, [a["chip_id"], b["chip_id"]], values, ["class"], tmp_path / "seg.tif", 0,
                              tags={"model": "test"}, classes=classes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.tif"]
    info = _gdalinfo(path)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert info["geoTransform"] == pytest.approx([a["minx"], 10.0, 0.0, a["maxy"], 0.0, -10.0])
    assert CRS.from_wkt(info["coordinateSystem"]["wkt"]) == CRS.from_user_input(store.attrs["crs"])
    band = info["bands"][0]
    assert band["type"] == "Byte" and band["noDataValue"] == 0 and band["colorInterpretation"] == "Palette"
    palette = {i: e for i, e in enumerate(band["colorTable"]["entries"])}
    c0 = classes[0]["color"]
    assert palette[int(codes[0])][:3] == [int(c0[i:i + 2], 16) for i in (1, 3, 5)]
    src, data, nd = _read_back(path)
    assert nd == 0 and data.shape == (1, 32, 64)
    np.testing.assert_array_equal(data[0], np.concatenate([values[0], values[1]], axis=1))
    with rasterio_open(path) as r:
        assert r.tags()["classes"].startswith(f"{classes[0]['code']}={classes[0]['name']}")


def test_chip_pixels_refuses_mismatched_values(store, tmp_path):
    from sarflow.data.export import export_chip_pixels

    ids = list(store.chips["chip_id"].iloc[:2])
    with pytest.raises(InputError, match="do not match"):
        export_chip_pixels(store, ids, np.zeros((2, 1, 16, 16), np.uint8), ["c"], tmp_path / "x.tif", 0)
    with pytest.raises(InputError, match="not in the store's chip table"):
        export_chip_pixels(store, ["nope"], np.zeros((1, 1, 32, 32), np.uint8), ["c"], tmp_path / "x.tif", 0)
    assert not any(tmp_path.iterdir())


def test_segmentation_prediction_map_is_the_predictions(store, tmp_path):
    """The segmentation run's map: class positions -> the label's declared codes, the label's nodata where a test
    chip has no input data and where no test chip lies, palette of the declared classes."""
    from types import SimpleNamespace

    import torch

    from sarflow.downstream.segmentation.run import prediction_map

    lab = store.array("worldcover")
    classes = [int(c["code"]) for c in lab.attrs["classes"]]
    t = store.chips
    a = t.iloc[0]
    b = t[(t["ix"] == a["ix"] + 1) & (t["iy"] == a["iy"] + 1)].iloc[0]  # a diagonal: two cells uncovered
    rng = np.random.default_rng(5)
    pred = torch.from_numpy(rng.integers(0, len(classes), (2, 32, 32)))
    x = torch.from_numpy(rng.normal(size=(2, 3, 32, 32)).astype(np.float32))
    x[0, :, 10:20, 3:9] = float("nan")  # no input in any channel: no prediction
    x[1, 0, :4, :4] = float("nan")  # one channel missing: still predicted
    data = SimpleNamespace(label="worldcover", classes=classes, test_chip_ids=[a["chip_id"], b["chip_id"]], x_test=x)
    path = prediction_map(str(store.path), data, pred, tmp_path / "segmentation_unet.tif", "unet")
    info = _gdalinfo(path)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    nodata = int(lab.attrs["nodata_in_store"])
    assert info["bands"][0]["noDataValue"] == nodata and info["bands"][0]["type"] == "Byte"
    src, data_back, nd = _read_back(path)
    want = np.asarray(classes, dtype=np.uint8)[pred.numpy()]
    want[0, 10:20, 3:9] = nodata
    minx, maxy = min(a["minx"], b["minx"]), max(a["maxy"], b["maxy"])
    assert src.transform[2] == pytest.approx(minx) and src.transform[5] == pytest.approx(maxy)
    for k, rec in enumerate((a, b)):
        r0, c0 = int(round((maxy - rec["maxy"]) / 10)), int(round((rec["minx"] - minx) / 10))
        np.testing.assert_array_equal(data_back[0, r0:r0 + 32, c0:c0 + 32], want[k])
    assert int((data_back == nodata).sum()) == 2 * 32 * 32 + 10 * 6  # two uncovered cells and the blind pixels


def rasterio_open(path):
    import rasterio

    return rasterio.open(path)

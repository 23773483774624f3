"""Learning from label proportions end to end: bags written as features, four models vs the
mean baseline, MLflow lineage and registration, bad inputs, the CLI and the real Kansas case."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from sarflow.downstream.llp.config import MODELS, LLPConfig
from sarflow.downstream.models import dataset_id
from sarflow.downstream.llp.run import PRIMARY_METRIC, run_llp
from sarflow.errors import InputError
from sarflow.features.bags import read_chip_bags, read_chip_bags_geo

EMB_MODEL = "rp-encoder"


def _write_random_projection_embeddings(store, root) -> None:
    """Embeddings in the partition format of `sarflow embed`: a fixed random projection (+ tanh)
    of per-chip band statistics, standing in for a pretrained encoder."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    chips = pd.read_parquet(store / "chips.parquet").sort_values("index")
    s1, s2 = g["s1grd"][:].astype(np.float32), g["s2rgb"][:].astype(np.float32)
    with np.errstate(all="ignore"):
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)
        feats = np.concatenate([np.nanmean(s1, axis=(2, 3)), np.nanstd(s1, axis=(2, 3)), np.nanmean(s2, axis=(2, 3)),
                                np.nanstd(s2, axis=(2, 3))], axis=1)
    feats = np.nan_to_num((feats - np.nanmean(feats, 0)) / (np.nanstd(feats, 0) + 1e-6))
    emb = np.tanh(feats @ np.random.default_rng(0).normal(size=(feats.shape[1], 24)) / 2).astype(np.float32)
    n, dim = emb.shape
    cent = shapely.centroid(shapely.from_wkb(chips["geometry"].to_numpy()))
    ts = datetime(2024, 1, 1, tzinfo=timezone.utc)
    table = pa.table({
        "chip_id": pa.array(chips["chip_id"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim).cast(pa.list_(pa.float32())),
        "model_name": [EMB_MODEL] * n, "model_version": ["1"] * n, "dataset_version": ["untracked"] * n,
        "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
        "lon": shapely.get_x(cent), "lat": shapely.get_y(cent), "split": chips["split"].tolist()})
    out = root / "embeddings" / f"model={EMB_MODEL}" / "version=1"
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000.parquet")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile import TileOptions, tile

    tmp = tmp_path_factory.mktemp("llprun")
    cat = synthesize(tmp / "scene", SynthConfig(size_px=384, seed=21, chip_size=32, municipality_km2=0.3,
                                                cloud_fraction=0.0))
    store = tile(load_catalog(cat), tmp / "chips.zarr", TileOptions(), show_progress=False)
    root = tmp / "features"
    _write_random_projection_embeddings(store, root)
    # drop the largest municipality: the chips inside it only are outside every polygon
    polys = gpd.read_file(cat.parent / "municipalities.geojson")
    utm = polys.to_crs(32632)
    dropped = polys.muni_id.iloc[int(utm.area.argmax())]
    polygons = tmp / "municipalities_minus_one.geojson"
    polys[polys.muni_id != dropped].to_file(polygons, driver="GeoJSON")
    stats = tmp / "municipality_stats_minus_one.csv"  # statistics naming a polygon that is not there are refused
    table = pd.read_csv(cat.parent / "municipality_stats.csv")
    table[table.muni_id != dropped].to_csv(stats, index=False)
    chips = pd.read_parquet(store / "chips.parquet")
    boxes = shapely.box(chips.minx, chips.miny, chips.maxx, chips.maxy)
    kept = shapely.union_all(utm[utm.muni_id != dropped].geometry.values)
    expected_outside = sorted(chips.chip_id[shapely.area(shapely.intersection(boxes, kept)) <= 1e-9 * 320 * 320])
    return {"tmp": tmp, "scene": cat.parent, "store": store, "root": root, "polygons": polygons,
            "stats": stats, "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "expected_outside": expected_outside, "chips": chips}


@pytest.fixture(scope="module")
def result(scene):
    cfg = LLPConfig(store=str(scene["store"]), tracking_uri=scene["uri"], polygons=str(scene["polygons"]),
                    stats=str(scene["stats"]), features_root=str(scene["root"]), bag_sizes=(1, 4), test_fraction=0.5)
    return run_llp(cfg)  # half the bags held out: ~30 test chips lie in no training bag (0.3 leaves 8: not evaluable)


def test_every_llp_model_beats_the_mean_baseline(result):
    m = result["metrics"]
    assert PRIMARY_METRIC == ("test_proportion_mae", False)
    assert result["features"] == f"{EMB_MODEL}/v1"
    for name in MODELS:
        assert m[f"{name}_proportion_mae"] < 0.85 * m["baseline_mae"], (name, m)
        assert 0 <= m[f"{name}_f1_macro"] <= 1 and 0 <= m[f"{name}_iou_macro"] <= 1
    assert 0 < m["conv_pixel_f1_macro"] <= 1 and 0 < m["conv_pixel_iou_macro"] <= 1
    # the model is chosen on held-out training bags (validation), never on the test chips
    best = result["best_model"]
    assert best == min(MODELS, key=lambda n: m[f"{n}_val_bag_mae"]) and "held-out training bags" in result["selection"]
    assert m["test_proportion_mae"] == m[f"{best}_proportion_mae"] and m["val_bag_mae"] == m[f"{best}_val_bag_mae"]
    assert result["task"] == "llp-worldcover" and result["label"] == "worldcover" and result["not_evaluable"] == {}
    table = pd.read_csv(result["table"])
    assert list(table.model[:4]) == list(MODELS) and table.model.iloc[-1].startswith("baseline")
    curve = pd.read_csv(result["curve"])
    assert list(curve.merge_factor) == [1, 4] and curve.mean_chips_per_bag.is_monotonic_increasing
    assert all(p.endswith(".png") for p in result["plots"]) and len(result["plots"]) == 3  # map, proportions, bag curve
    assert any(p.endswith("llp_proportion_maps.png") for p in result["plots"])


def test_mlflow_run_has_lineage_and_the_registered_model_predicts_proportions(scene, result):
    import mlflow

    mlflow.set_tracking_uri(scene["uri"])
    run = mlflow.get_run(result["run_id"])
    tags, params = run.data.tags, run.data.params
    assert tags["sarflow.catalog_hash"] and tags["sarflow.store"] == str(scene["store"])
    assert "sarflow.code_commit" in tags and "sarflow.dataset_dvc_md5" in tags
    assert int(params["outside_chips"]) == result["outside"]
    for name in MODELS:
        assert f"{name}_proportion_mae" in run.data.metrics
    assert "baseline_mae" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "llp")}
    assert {"llp/llp_results.csv", "llp/llp_map.png", "llp/bag_size_curve.png"} <= arts
    reg = result["registered"]
    assert reg["name"] == "sarflow-llp-worldcover"
    assert result["models"] == {reg["name"]: {"version": reg["version"], "metric": "test_proportion_mae",
                                              "higher_is_better": False}}
    assert run.data.tags["sarflow.llp.selection"] == result["selection"]
    mv = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"])
    assert mv.tags["sarflow.eval_set"] == f"{dataset_id(tags)}:test:llp-worldcover"
    assert float(mv.tags["sarflow.metric.test_proportion_mae"]) == pytest.approx(result["metrics"]["test_proportion_mae"])
    classes = json.loads(mv.tags["sarflow.llp.classes"])
    assert classes == [10, 20, 30, 40, 50, 60, 80, 90]  # the statistics' classes, all declared by the label
    model = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg['version']}")
    if result["best_model"] == "conv":
        import zarr

        from sarflow.data.chipstore import input_modalities, read_masked

        g = zarr.open_group(str(scene["store"]), mode="r")
        x = np.concatenate([read_masked(g[m], slice(0, 5)) for m in input_modalities(g)], axis=1)  # NaN kept
    else:
        from sarflow.features.embed import embedding_matrix, read_embeddings

        x = embedding_matrix(read_embeddings(scene["root"], EMB_MODEL, "1"))[:5]
    pred = np.asarray(model.predict(x))
    assert pred.shape == (5, len(classes))
    np.testing.assert_allclose(pred.sum(axis=1), 1.0, atol=1e-5)


def test_chip_bags_are_one_row_per_chip_with_weights_summing_to_one(scene, result):
    table = pq.read_table(result["bags"])
    assert table.schema.field("chip_id").type == pa.string()
    assert table.schema.field("bag_ids").type == pa.list_(pa.string())
    assert table.schema.field("bag_weights").type == pa.list_(pa.float64())
    assert table.schema.field("area_fractions").type == pa.list_(pa.float64())
    assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    df = read_chip_bags(scene["root"])
    assert df.chip_id.is_unique
    assert len(df) + result["outside"] == len(scene["chips"])
    np.testing.assert_allclose([w.sum() for w in df.bag_weights], 1.0, atol=1e-9)
    assert all(len(b) == len(w) == len(f) for b, w, f in zip(df.bag_ids, df.bag_weights, df.area_fractions))
    assert (df.bag_ids.map(len) > 1).any()  # border chips belong to several bags
    geo = read_chip_bags_geo(scene["root"])
    assert geo.crs.to_epsg() == 4326 and len(geo) == sum(map(len, df.bag_ids))
    assert set(geo.chip_id) == set(df.chip_id) and geo.geometry.is_valid.all()
    assert isinstance(gpd.read_parquet(scene["root"] / "bags" / "chip_bags_geo.parquet"), gpd.GeoDataFrame)


def test_chips_outside_every_polygon_are_reported(scene, result):
    assert scene["expected_outside"], "the dropped municipality should leave chips outside"
    assert result["outside"] == len(scene["expected_outside"])
    assert sorted(result["outside_chips"]) == scene["expected_outside"]
    assert not set(result["outside_chips"]) & set(read_chip_bags(scene["root"]).chip_id)


def _cfg(scene, **kw) -> LLPConfig:
    base = dict(store=str(scene["store"]), tracking_uri=scene["uri"], polygons=str(scene["polygons"]),
                stats=str(scene["stats"]), models=("linear",), steps=5, bag_sizes=(), register=False,
                out_dir=str(scene["tmp"] / "bad-out"))
    return LLPConfig(**{**base, **kw})


def test_bad_inputs_name_the_file(scene, tmp_path):
    stats = pd.read_csv(scene["stats"])
    unknown_bag = tmp_path / "unknown_bag.csv"  # a row for a municipality the polygons do not have
    pd.concat([stats, stats.iloc[[0]].assign(muni_id="M9999")]).to_csv(unknown_bag, index=False)
    with pytest.raises(InputError, match="name no polygon") as e:
        run_llp(_cfg(scene, stats=str(unknown_bag)))
    assert e.value.where == str(unknown_bag)

    no_class = tmp_path / "no_class.csv"
    stats.drop(columns=["frac_30"]).to_csv(no_class, index=False)
    with pytest.raises(InputError, match="frac_30") as e:
        run_llp(_cfg(scene, stats=str(no_class), classes=(10, 20, 30, 40)))
    assert e.value.where == str(no_class)
    no_fracs = tmp_path / "no_fracs.csv"
    stats[["muni_id", "valid_pixels"]].to_csv(no_fracs, index=False)
    with pytest.raises(InputError, match="frac_") as e:
        run_llp(_cfg(scene, stats=str(no_fracs)))
    assert e.value.where == str(no_fracs)

    no_id = tmp_path / "no_id.geojson"
    gpd.read_file(scene["polygons"]).rename(columns={"muni_id": "code"}).to_file(no_id, driver="GeoJSON")
    with pytest.raises(InputError, match="muni_id") as e:
        run_llp(_cfg(scene, polygons=str(no_id)))
    assert e.value.where == str(no_id)

    absent = tmp_path / "nope.geojson"
    with pytest.raises(InputError, match="does not exist") as e:
        run_llp(_cfg(scene, polygons=str(absent)))
    assert e.value.where == str(absent)
    with pytest.raises(InputError):
        run_llp(_cfg(scene, models=("svm",)))
    with pytest.raises(InputError, match="not a fraction of the training bags"):
        run_llp(_cfg(scene, val_fraction=1.0))

    # proportions of codes the label does not declare: the file and the codes are named
    undeclared = tmp_path / "undeclared.csv"
    stats.assign(frac_99=0.0, frac_7=0.0).to_csv(undeclared, index=False)
    with pytest.raises(InputError, match=r"class code\(s\) \[7, 99\] are not classes of label 'worldcover'") as e:
        run_llp(_cfg(scene, stats=str(undeclared)))
    assert e.value.where == str(undeclared)
    named = tmp_path / "named.csv"
    stats.rename(columns={"frac_10": "frac_trees"}).to_csv(named, index=False)
    with pytest.raises(InputError, match=r"integer class codes, not \['trees'\]") as e:
        run_llp(_cfg(scene, stats=str(named)))
    assert e.value.where == str(named)
    with pytest.raises(InputError, match=r"class code\(s\) \[5\] are not classes"):
        run_llp(_cfg(scene, classes=(5, 10)))
    # the label must be a categorical label of the store; the pixel model reads continuous inputs
    with pytest.raises(InputError, match="label 'vegetation' is continuous: a categorical label is needed"):
        run_llp(_cfg(scene, truth_modality="vegetation"))
    with pytest.raises(InputError, match="no label source 'landcover'"):
        run_llp(_cfg(scene, truth_modality="landcover"))
    with pytest.raises(InputError, match=r"modalities \['worldcover'\] are labels"):
        run_llp(_cfg(scene, pixel_modalities=("worldcover",)))
    assert not (scene["tmp"] / "bad-out").exists()  # refused before anything was written


def test_cli_trains_from_a_label_raster_and_reports_errors(scene, tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.llp import llp_app

    run = CliRunner().invoke(llp_app, [
        "train", str(scene["store"]), "--polygons", str(scene["scene"] / "municipalities.geojson"),
        "--label-raster", str(scene["scene"] / "worldcover.tif"), "--tracking-uri", scene["uri"],
        "--models", "linear", "--models", "conv", "--steps", "150", "--bag-size", "1", "--no-register",
        "--out", str(tmp_path / "out"), "--experiment", "sarflow-llp-cli"])
    assert run.exit_code == 0, run.output
    assert "baseline" in run.output and "conv" in run.output and "chips outside every polygon: 0" in run.output
    assert (tmp_path / "out" / "bags" / "chip_bags.parquet").is_file()
    bad = CliRunner().invoke(llp_app, ["train", str(scene["store"]), "--polygons", str(tmp_path / "nope.geojson"),
                                       "--stats", str(scene["stats"]), "--tracking-uri", scene["uri"]])
    assert bad.exit_code == 2
    assert "error:" in bad.output and "nope.geojson" in bad.output


def test_real_kansas_case_beats_the_baseline(real_data, tmp_path):
    from sarflow.downstream.llp.real_case import run_real_case

    import rasterio

    res = run_real_case(real_data, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "real", bag_sizes=(1, 2))
    m = res["metrics"]
    for name in MODELS:
        assert m[f"{name}_proportion_mae"] < 0.6 * m["baseline_mae"], (name, m)
        assert m[f"{name}_f1_macro"] > 0.8, (name, m)
    assert res["outside"] == 0  # the Kansas chip lies inside county 20121
    bags = read_chip_bags(tmp_path / "real")
    assert len(bags) == 256
    # through the store, without renaming: the hand label's raster has no nodata tag, the catalog's -1 is used
    assert res["task"] == "llp-real-USA_905409" and res["classes"] == [0, 1] and res["models"] == {}
    assert "held-out training bags" in res["selection"]
    with rasterio.open(real_data / "sen1floods11" / "USA_905409_LabelHand.tif") as src:
        assert src.nodata is None
        lab = src.read(1)
    stats = pd.read_csv(tmp_path / "real" / "bag_statistics.csv")
    assert stats.valid_pixels.sum() == (lab >= 0).sum()  # every labelled pixel: dry and water, not the -1s
    dry = float((stats.frac_0 * stats.valid_pixels).sum() / stats.valid_pixels.sum())
    assert dry == pytest.approx((lab == 0).sum() / (lab >= 0).sum(), abs=1e-6) and 0.8 < dry < 0.85


def test_label_raster_aggregation_reproduces_the_statistics(scene):
    from sarflow.downstream.llp.data import polygon_class_fractions, read_polygons

    stats = pd.read_csv(scene["stats"], dtype={"muni_id": str})
    classes = [int(c[5:]) for c in stats.columns if c.startswith("frac_")]
    agg = polygon_class_fractions(scene["scene"] / "worldcover.tif",
                                  read_polygons(scene["scene"] / "municipalities.geojson", "muni_id"), "muni_id", classes)
    both = stats.merge(agg, on="muni_id", suffixes=("", "_raster"))
    assert len(both) == len(stats)
    np.testing.assert_array_equal(both.valid_pixels, both.valid_pixels_raster)
    for c in classes:
        np.testing.assert_allclose(both[f"frac_{c}"], both[f"frac_{c}_raster"], atol=1e-5)
    with pytest.raises(InputError, match="does not exist"):
        polygon_class_fractions(scene["tmp"] / "absent.tif", read_polygons(scene["polygons"], "muni_id"), "muni_id")


# ---------------------------------------------------------------- a 0/1 water label with nodata -1

def water_scene(folder, *, water: bool = True, label_tag=None, second_label: bool = False, dry_boxes=(),
                size: int = 384, seed: int = 0):
    """A scene whose label is a 0 dry / 1 water mask with nodata -1 (as Sen1Floods11's), made with
    rasterio: a SAR input `sar` (VV, VH in dB, NaN on its top rows) that sees the water, and the
    label `flood` (int16) whose raster carries the nodata tag `label_tag` (None: no tag, as the
    Sen1Floods11 files); the catalog declares nodata -1. `water=False`: every labelled pixel is dry;
    `dry_boxes`: (minx, miny, maxx, maxy) boxes of the grid CRS made dry.
    Bag polygons `cells.geojson` (id `cell`) of 2 x 2 chips each. Returns the catalog."""
    import rasterio
    import yaml
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    x0, y0, res = 499840.0, 4300160.0, 10.0  # multiples of the 320 m chip: chips align with the rasters
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.int16)
    if water:
        river = np.abs(yy - (0.5 * size + 0.15 * size * np.sin(xx / (0.1 * size)))) < 0.06 * size
        for _ in range(6):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.03, 0.08) * size
            river |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label[river] = 1
    for minx, miny, maxx, maxy in dry_boxes:
        label[int(round((y0 - maxy) / res)):int(round((y0 - miny) / res)),
              int(round((minx - x0) / res)):int(round((maxx - x0) / res))] = 0
    label[:, :5] = -1  # a strip without label
    vv = np.where(label == 1, -21.0, -9.0) + rng.normal(0, 1.5, label.shape)
    sar = np.stack([vv, vv - 7.0 + rng.normal(0, 1.0, label.shape)]).astype(np.float32)
    sar[:, :3, :] = np.nan
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32615", transform=from_origin(x0, y0, res, res))
    with rasterio.open(folder / "sar.tif", "w", count=2, dtype="float32", nodata=float("nan"), **profile) as ds:
        ds.write(sar)
    with rasterio.open(folder / "flood.tif", "w", count=1, dtype="int16", nodata=label_tag, **profile) as ds:
        ds.write(label[None])
    flood = {"name": "flood", "uris": ["flood.tif"], "bands": ["flood"], "units": "class", "kind": "categorical",
             "classes": {0: "dry", 1: {"name": "water", "color": "#1f5fd0"}}, "nodata": -1}
    sources = [{"name": "sar", "uris": ["sar.tif"], "bands": ["VV", "VH"], "units": "dB", "kind": "continuous"}, flood]
    if second_label:
        sources.append({**flood, "name": "flood_again"})
    (folder / "catalog.yaml").write_text(yaml.safe_dump(
        {"grid": {"crs": 32615, "resolution": res, "chip_size": 32, "aoi": "intersection"}, "sources": sources},
        sort_keys=False))
    cell, n = 64 * res, size // 64
    cells = [shapely.box(x0 + i * cell, y0 - (j + 1) * cell, x0 + (i + 1) * cell, y0 - j * cell)
             for j in range(n) for i in range(n)]
    gpd.GeoDataFrame({"cell": [f"C{k:02d}" for k in range(len(cells))]}, geometry=cells, crs="EPSG:32615").to_file(
        folder / "cells.geojson", driver="GeoJSON")
    return folder / "catalog.yaml"


def water_store(folder, **kw):
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    cat = water_scene(folder / "scene", **kw)
    return cat.parent, tile(load_catalog(cat), folder / "chips.zarr", TileOptions(), show_progress=False)


def cell_fractions(scene_dir) -> pd.DataFrame:
    """An independent reference: each 64 px cell's dry and water share of its labelled pixels."""
    import rasterio

    with rasterio.open(scene_dir / "flood.tif") as ds:
        lab = ds.read(1)
    n = lab.shape[0] // 64
    rows = []
    for j in range(n):
        for i in range(n):
            c = lab[j * 64:(j + 1) * 64, i * 64:(i + 1) * 64]
            valid = (c >= 0).sum()
            rows.append({"cell": f"C{j * n + i:02d}", "frac_0": (c == 0).sum() / valid, "frac_1": (c == 1).sum() / valid})
    return pd.DataFrame(rows).set_index("cell")


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("water")
    scene_dir, store = water_store(tmp)
    return {"tmp": tmp, "scene": scene_dir, "store": store, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def _water_cfg(water, **kw) -> LLPConfig:
    base = dict(store=str(water["store"]), tracking_uri=water["uri"], polygons=str(water["scene"] / "cells.geojson"),
                id_column="cell", label_raster=str(water["scene"] / "flood.tif"), steps=150, bag_sizes=(),
                out_dir=str(water["tmp"] / "out"))
    return LLPConfig(**{**base, **kw})


def test_a_water_label_with_nodata_minus_one_runs_without_renaming(water):
    """The Sen1Floods11 case: a 0 dry / 1 water label whose raster has no nodata tag; the store's
    declared nodata (-1) is used, so the dry class is a class and the nodata code is not."""
    import mlflow

    from sarflow.downstream.llp.data import prepare_store_data

    data, extra = prepare_store_data(_water_cfg(water))
    assert data.classes == [0, 1] and data.class_names == ["dry", "water"] and data.label == "flood"
    assert extra["label_nodata"] == -1 and extra["pixel_modalities"] == ["sar"]
    expected = cell_fractions(water["scene"])
    got = data.bags.proportions.loc[expected.index]
    np.testing.assert_allclose(got[["frac_0", "frac_1"]].to_numpy(), expected.to_numpy(), atol=1e-9)
    assert 0.6 < expected.frac_0.mean() < 0.95  # mostly dry: the dry class is kept, not dropped
    # the chips' fine labels: dry and water fractions of the labelled pixels, the -1 strip is no class
    chip_dry = data.truth[data.truth_valid][:, 0].mean()
    assert abs(chip_dry - expected.frac_0.mean()) < 0.05
    assert data.input_valid.all() and np.isnan(data.pixels).any()  # the SAR NaN rows reach the model as NaN

    res = run_llp(_water_cfg(water))
    m = res["metrics"]
    assert res["task"] == "llp-flood" and res["classes"] == [0, 1] and res["not_evaluable"] == {}
    assert m["test_proportion_mae"] < 0.5 * m["baseline_mae"] and m["test_f1_macro"] > 0.8, m
    assert list(res["models"]) == ["sarflow-llp-flood"]
    mlflow.set_tracking_uri(water["uri"])
    run = mlflow.get_run(res["run_id"])
    assert run.data.params["label_nodata"] == "-1.0" and run.data.params["classes"] == "0,1"
    assert run.data.params["label"] == "flood"


def test_label_nodata_comes_from_the_flag_the_store_or_the_raster_and_is_never_guessed(water, tmp_path):
    import rasterio

    from sarflow.downstream.llp.data import polygon_class_fractions, prepare_store_data, read_polygons

    polys = read_polygons(water["scene"] / "cells.geojson", "cell")
    expected = cell_fractions(water["scene"])
    # a raster tagged with a wrong nodata (0, the dry class): the store's declaration wins
    wrong = tmp_path / "flood_tag0.tif"
    with rasterio.open(water["scene"] / "flood.tif") as src:
        profile, lab = src.profile, src.read()
    with rasterio.open(wrong, "w", **{**profile, "nodata": 0}) as ds:
        ds.write(lab)
    data, _ = prepare_store_data(_water_cfg(water, label_raster=str(wrong)))
    np.testing.assert_allclose(data.bags.proportions.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-9)
    # without a declaration or a flag, the raster's own tag: -1 gives the same fractions
    tagged = tmp_path / "flood_tagged.tif"
    with rasterio.open(tagged, "w", **{**profile, "nodata": -1}) as ds:
        ds.write(lab)
    agg = polygon_class_fractions(tagged, polys, "cell", [0, 1]).set_index("cell")
    np.testing.assert_allclose(agg.loc[expected.index, ["frac_0", "frac_1"]].to_numpy(), expected.to_numpy(), atol=1e-9)
    # codes outside the classes are no class: left out and counted
    odd = lab.copy()
    odd[0, 100:110, 100:110] = 7
    odd_path = tmp_path / "flood_odd.tif"
    with rasterio.open(odd_path, "w", **profile) as ds:
        ds.write(odd)
    agg = polygon_class_fractions(odd_path, polys, "cell", [0, 1], nodata=-1)
    assert agg.attrs["undeclared"] == {7: 100}
    np.testing.assert_allclose(agg[["frac_0", "frac_1"]].sum(axis=1), 1.0)
    # no tag and no declaration: refused, naming the raster (no silent 0)
    with pytest.raises(InputError, match="no nodata tag and no nodata is declared") as e:
        polygon_class_fractions(water["scene"] / "flood.tif", polys, "cell", [0, 1])
    assert e.value.where == str(water["scene"] / "flood.tif")
    # the flag wins over the store's declaration (here: calling water "no data" leaves only dry)
    data, extra = prepare_store_data(_water_cfg(water, label_nodata=1))
    assert extra["label_nodata"] == 1 and extra["undeclared_pixels"] == {-1: 5 * 384}
    assert (data.bags.proportions["frac_0"] == 1).all()


def test_a_one_class_test_set_is_not_evaluable_and_nothing_is_registered(tmp_path):
    import mlflow

    scene_dir, store = water_store(tmp_path, water=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = LLPConfig(store=str(store), tracking_uri=uri, polygons=str(scene_dir / "cells.geojson"), id_column="cell",
                    label_raster=str(scene_dir / "flood.tif"), steps=20, bag_sizes=(), out_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"no task is evaluable on this store: llp-flood: test \(held-out bags\) split "
                                         r"has fewer than two classes") as e:
        run_llp(cfg)
    assert e.value.where == str(store)
    assert not (tmp_path / "out").exists()  # no table, no plots, no bags
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_the_label_must_be_chosen_when_the_store_has_several(tmp_path):
    import zarr

    from sarflow.downstream.llp.data import llp_label

    scene_dir, store = water_store(tmp_path, second_label=True)
    group = zarr.open_group(str(store), mode="r")
    with pytest.raises(InputError, match=r"several categorical labels \['flood', 'flood_again'\]: choose .* --label"):
        llp_label(group, str(store))
    assert llp_label(group, str(store), "flood_again").name == "flood_again"
    res = run_llp(LLPConfig(store=str(store), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            polygons=str(scene_dir / "cells.geojson"), id_column="cell", truth_modality="flood_again",
                            label_raster=str(scene_dir / "flood.tif"), models=("linear",), steps=30, bag_sizes=(),
                            register=False, out_dir=str(tmp_path / "out")))
    assert res["task"] == "llp-flood_again" and res["models"] == {} and res["classes"] == [0, 1]


def test_the_store_split_trains_on_bags_with_train_chips_and_scores_the_test_chips_only(water, tmp_path):
    res = run_llp(_water_cfg(water, split="store", models=("linear", "conv"), register=False,
                             out_dir=str(tmp_path / "out")))
    import mlflow

    chips = pd.read_parquet(water["store"] / "chips.parquet")
    mlflow.set_tracking_uri(water["uri"])
    params = mlflow.get_run(res["run_id"]).data.params
    assert int(params["test_chips"]) == (chips["split"] == "test").sum()  # not val, not buffer
    assert res["models"] == {} and res["metrics"]["test_proportion_mae"] < res["metrics"]["baseline_mae"]


def test_prediction_maps_are_cogs_that_gdal_opens_on_the_stores_grid(scene, result, gdalwarp):
    """Issue 15: LLP's predictions as maps GDAL, QGIS and rasterio open in place: one pixel per chip
    cell, each chip's proportions (summing to 1) and majority class where its bounds are."""
    import json
    import shutil
    import subprocess

    import rasterio

    proportions, majority = (Path(p) for p in result["maps"])
    gdalinfo = shutil.which("gdalinfo") or str(Path(gdalwarp).with_name("gdalinfo"))
    info = json.loads(subprocess.run([gdalinfo, "-json", str(majority)], capture_output=True, text=True, check=True).stdout)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG" and info["bands"][0]["colorInterpretation"] == "Palette"
    chips = scene["chips"].set_index("chip_id")
    with rasterio.open(proportions) as p, rasterio.open(majority) as m:
        assert p.crs.to_epsg() == 32632 and p.res == (320.0, 320.0) and p.count == len(result["classes"])
        probs, codes = p.read(), m.read(1)
        assert np.allclose(np.nansum(probs, axis=0)[codes != m.nodata], 1.0, atol=1e-4)
        for chip_id in chips.index[:20]:
            rec = chips.loc[chip_id]
            r, c = p.index(rec.minx + 1, rec.maxy - 1)  # the chip's cell: its top-left corner
            assert codes[r, c] in result["classes"]
            assert codes[r, c] == result["classes"][int(np.argmax(probs[:, r, c]))]

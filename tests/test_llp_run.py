"""Learning from label proportions end to end: bags written as features, four models vs the
mean baseline, MLflow lineage and registration, bad inputs, the CLI and the real Kansas case."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from sarflow.downstream.llp.config import MODELS, LLPConfig
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
    chips = pd.read_parquet(store / "chips.parquet")
    boxes = shapely.box(chips.minx, chips.miny, chips.maxx, chips.maxy)
    kept = shapely.union_all(utm[utm.muni_id != dropped].geometry.values)
    expected_outside = sorted(chips.chip_id[shapely.area(shapely.intersection(boxes, kept)) <= 1e-9 * 320 * 320])
    return {"tmp": tmp, "scene": cat.parent, "store": store, "root": root, "polygons": polygons,
            "stats": cat.parent / "municipality_stats.csv", "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "expected_outside": expected_outside, "chips": chips}


@pytest.fixture(scope="module")
def result(scene):
    cfg = LLPConfig(store=str(scene["store"]), tracking_uri=scene["uri"], polygons=str(scene["polygons"]),
                    stats=str(scene["stats"]), features_root=str(scene["root"]), bag_sizes=(1, 4))
    return run_llp(cfg)


def test_every_llp_model_beats_the_mean_baseline(result):
    m = result["metrics"]
    assert PRIMARY_METRIC == ("test_proportion_mae", False)
    assert result["features"] == f"{EMB_MODEL}/v1"
    for name in MODELS:
        assert m[f"{name}_proportion_mae"] < 0.85 * m["baseline_mae"], (name, m)
        assert 0 <= m[f"{name}_f1_macro"] <= 1 and 0 <= m[f"{name}_iou_macro"] <= 1
    assert 0 < m["conv_pixel_f1_macro"] <= 1 and 0 < m["conv_pixel_iou_macro"] <= 1
    assert m["test_proportion_mae"] == min(m[f"{n}_proportion_mae"] for n in MODELS)
    table = pd.read_csv(result["table"])
    assert list(table.model[:4]) == list(MODELS) and table.model.iloc[-1].startswith("baseline")
    curve = pd.read_csv(result["curve"])
    assert list(curve.merge_factor) == [1, 4] and curve.mean_chips_per_bag.is_monotonic_increasing
    assert all(p.endswith(".png") for p in result["plots"]) and len(result["plots"]) == 2


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
    assert reg["name"] == "sarflow-llp-landcover"
    mv = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"])
    assert mv.tags["sarflow.eval_set"].endswith(":llp:test") and "sarflow.metric.test_proportion_mae" in mv.tags
    classes = json.loads(mv.tags["sarflow.llp.classes"])
    model = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg['version']}")
    if result["best_model"] == "conv":
        import zarr

        g = zarr.open_group(str(scene["store"]), mode="r")
        x = np.nan_to_num(np.concatenate([g["s1grd"][:5], g["s2rgb"][:5]], axis=1).astype(np.float32))
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
    missing_bag = tmp_path / "missing_bag.csv"
    stats.iloc[1:].to_csv(missing_bag, index=False)
    with pytest.raises(InputError, match="no proportions for bag") as e:
        run_llp(_cfg(scene, stats=str(missing_bag)))
    assert e.value.where == str(missing_bag)

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

    res = run_real_case(real_data, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "real", bag_sizes=(1, 2))
    m = res["metrics"]
    for name in MODELS:
        assert m[f"{name}_proportion_mae"] < 0.6 * m["baseline_mae"], (name, m)
        assert m[f"{name}_f1_macro"] > 0.8, (name, m)
    assert res["outside"] == 0  # the Kansas chip lies inside county 20121
    bags = read_chip_bags(tmp_path / "real")
    assert len(bags) == 256


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

"""Acceptance on real catalogs the code has never seen (../shared/data/real, skipped when absent):
the whole chain through the `sarflow` commands a user types (ingest, tile, pretrain, embed,
labels, Feast apply + materialize, probes, LLP where bags exist, promote), with each catalog's
own names, codes and nodata conventions. Every case either finishes with correct,
non-degenerate outputs or fails with a clear error; never exit 0 with a number it could not
measure.

- Sen1Floods11 Kansas (USA_905409): S1 dB + a hand water label (int16: -1 nodata, 0 dry,
  1 water) declared as its own two classes; Miami County (FIPS 20121) as the LLP bag.
- BigEarthNet: two Irish patches, S1 VV/VH + all 12 S2 L2A bands (uint16, nodata 0) at 10/20/60 m:
  every band reaches the encoder (14 input channels); no label, so no task.
- CORINE Lausanne: CLC 2012 (EEA grid codes, nodata 255) as a label with `legend: corine`,
  the 2006 inventory as the only (categorical) input: tasks and labels from the legend;
  pretraining refuses inputs that are all class codes.
- a SAR-only store (Sen1Floods11 S1 of two flood events): pretrain and embed; probes refuse
  with "no label".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

# The demo's pipelines are built when their module is imported, and KFP's resource setters walk the
# stack (inspect.stack) at a cost that grows with the modules loaded: imported here, at collection,
# before the chains load torch, MLflow and Feast, that takes about 18 s of CPU instead of about 55 s.
import pipelines.e2e  # noqa: F401

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "pretrain": {"method": "mae", "batch_size": 16, "workers": 0,
                 "vit": {"size": "tiny", "patch": 8, "depth": 1, "dim": 32, "heads": 2},
                 "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 4},
                 "methods": {"mae": {"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1}}},
    "downstream": {"sizes": [25, 0], "draws": 2, "baselines": ["pixel_stats"]},
    "llp": {"steps": 40, "models": ["linear"], "bag_sizes": [1]},
}
S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


def sarflow(*args, ok: bool = True):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"sarflow {' '.join(map(str, args))}:\n{res.output[-3000:]}"
    return res


def _chain_to_embeddings(catalog: Path, tmp: Path) -> dict:
    """ingest -> tile -> pretrain (tiny MAE) -> embed; returns the paths and the MLflow URI."""
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    store, root = tmp / "chips.zarr", tmp / "features"
    sarflow("ingest", catalog)
    sarflow("tile", catalog, "--out", store)
    sarflow("pretrain", store, "--params", params, "--tracking-uri", uri)
    sarflow("embed", store, "--model", "models:/sarflow-encoder-mae/1", "--features-root", root, "--tracking-uri", uri,
            "--params", params)
    return {"store": store, "root": root, "uri": uri, "params": params, "tmp": tmp}


def _labels_and_features(ctx: dict) -> None:
    sarflow("features", "labels", ctx["store"], "--features-root", ctx["root"], "--params", ctx["params"])
    repo = ctx["tmp"] / "feast"
    sarflow("features", "apply", "--features-root", ctx["root"], "--repo", repo, "--params", ctx["params"])
    sarflow("features", "materialize", "--features-root", ctx["root"], "--repo", repo, "--params", ctx["params"])


def _probe(ctx: dict, ok: bool = True):
    out = ctx["tmp"] / "probes"
    res = sarflow("downstream", "probe", ctx["store"], "--features-root", ctx["root"], "--tracking-uri", ctx["uri"],
                  "--params", ctx["params"], "--out", out, ok=ok)
    result = json.loads((out / "probes.json").read_text()) if ok else None
    return res, result


def _registered(uri: str) -> dict[str, list]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return {m.name: client.search_model_versions(f"name='{m.name}'") for m in client.search_registered_models()}


def _assert_honest(result: dict, uri: str) -> None:
    """Every registered model has finite metrics from a split that could measure them; nothing
    not evaluable is registered."""
    import mlflow

    registered = _registered(uri)
    client = mlflow.MlflowClient(uri)
    for task in result["not_evaluable"]:
        assert f"sarflow-{task.replace('_', '-')}" not in registered
    for name, info in result["models"].items():
        assert name in registered
        run = client.get_run(registered[name][0].run_id)
        value = run.data.metrics[info["metric"]]
        assert np.isfinite(value), (name, info)


def _write(path: Path, catalog: dict) -> Path:
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


# ------------------------------------------------------------------------ Sen1Floods11 Kansas

@pytest.fixture(scope="module")
def kansas(real_data, tmp_path_factory):
    d = real_data / "sen1floods11"
    tmp = tmp_path_factory.mktemp("kansas")
    catalog = _write(tmp / "catalog.yaml", {
        "grid": {"crs": "utm", "resolution": 10, "chip_size": 32},
        "sources": [
            {"name": "s1", "uris": [str(d / "USA_905409_S1Hand.tif")], "bands": ["VV", "VH"], "units": "dB",
             "kind": "continuous"},
            {"name": "flood", "uris": [str(d / "USA_905409_LabelHand.tif")], "bands": ["water"], "units": "class",
             "kind": "categorical", "nodata": -1, "classes": {0: "dry", 1: {"name": "water", "color": "#0000ff"}}},
        ]})
    counties = json.loads((real_data / "admin" / "geojson-counties-fips.json").read_text())
    miami = [f for f in counties["features"] if f["id"] == "20121"]
    for f in miami:
        f["properties"] = {"fips": f["id"], "name": f["properties"]["NAME"]}
    (tmp / "county.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": miami}))
    ctx = _chain_to_embeddings(catalog, tmp)
    _labels_and_features(ctx)
    return ctx | {"catalog": catalog, "county": tmp / "county.geojson", "label": d / "USA_905409_LabelHand.tif"}


def test_kansas_water_label_keeps_its_codes_and_nodata(kansas):
    """The label's own classes reach the store and the label features: dry is a class, -1 is not."""
    import pandas as pd
    import rasterio

    from sarflow.data.chipstore import label_sources, open_chip_group

    (lab,) = label_sources(open_chip_group(str(kansas["store"])))
    assert lab.name == "flood" and lab.codes == [0, 1] and lab.class_name(1) == "water"
    labels = pd.read_parquet(kansas["root"] / "labels" / "labels.parquet")
    assert {"flood__frac_0", "flood__frac_1", "flood__labelled"} <= set(labels.columns)
    with rasterio.open(kansas["label"]) as ds:
        raw = ds.read(1)
    truth_water = (raw == 1).sum() / np.isin(raw, (0, 1)).sum()  # independent: the raster's own pixel counts
    labelled = labels["flood__labelled"].to_numpy()
    water = np.nansum(labels["flood__frac_1"] * labelled) / labelled.sum()
    assert abs(water - truth_water) < 0.02, (water, truth_water)


def test_kansas_probes_are_measurable_or_not_evaluable(kansas):
    res, result = _probe(kansas)
    assert set(result["models"]) | {f"sarflow-{t.replace('_', '-')}" for t in result["not_evaluable"]} == \
        {"sarflow-flood", "sarflow-flood-fraction"}
    _assert_honest(result, kansas["uri"])
    for task, why in result["not_evaluable"].items():
        assert task in res.output and why.split("(")[0].strip() in res.output


def test_kansas_llp_with_the_county_as_its_bag(kansas):
    """One bag (Miami County), proportions from the hand label with nodata -1 as declared: the
    dry class is kept, the nodata code is not a class; one bag cannot be split into train and
    test bags, so LLP either refuses with that reason or scores on the store's split."""
    import rasterio

    from sarflow.downstream.llp.data import polygon_class_fractions, read_polygons

    polygons = read_polygons(kansas["county"], "fips")
    fractions = polygon_class_fractions(kansas["label"], polygons, "fips", [0, 1], nodata=-1)
    row = fractions.iloc[0]
    with rasterio.open(kansas["label"]) as ds:
        raw = ds.read(1)
    truth_dry = (raw == 0).sum() / np.isin(raw, (0, 1)).sum()  # the chip lies inside the county: 0.830
    assert abs(row["frac_0"] - truth_dry) < 1e-3 and abs(row["frac_0"] + row["frac_1"] - 1) < 1e-6
    res = sarflow("llp", "train", kansas["store"], "--polygons", kansas["county"], "--id-column", "fips",
                  "--label-raster", kansas["label"], "--features-root", kansas["root"], "--tracking-uri", kansas["uri"],
                  "--params", kansas["params"], "--split", "store", ok=False)
    registered = _registered(kansas["uri"])
    if res.exit_code != 0:
        assert "Traceback" not in res.output and "bag" in res.output.lower(), res.output[-2000:]
        assert "sarflow-llp-flood" not in registered
    else:
        assert "sarflow-llp-flood" in registered
        assert "-1" not in res.output.split("classes")[-1][:40]


def test_kansas_gate_promotes_a_measured_probe(kansas):
    _, result = _probe(kansas)
    for name, info in result["models"].items():
        res = sarflow("promote", name, "--metric", info["metric"], "--tracking-uri", kansas["uri"],
                      *([] if info["higher_is_better"] else ["--lower-is-better"]), ok=False)
        assert res.exit_code == 0, res.output[-2000:]


@pytest.mark.timeout(900)
def test_demo_on_the_kansas_catalog_runs_its_own_tasks_and_skips_llp(kansas, tmp_path, monkeypatch):
    """`sarflow demo --catalog` on a catalog the demo never saw: its own label's tasks are probed,
    registered and gated; LLP (no bag files beside the catalog) is skipped with a line."""
    monkeypatch.chdir(ROOT)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "tile": {"shard_chips": 16, "workers": 2}}))
    out = tmp_path / "demo"
    res = sarflow("demo", "--catalog", kansas["catalog"], "--out", out, "--params", params)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"]["state"] == "SUCCEEDED"
    assert summary["store_summary"]["modalities"].keys() == {"s1", "flood"}
    assert "sarflow-flood" in summary["mlflow"]["registered_models"]
    assert summary["champions"]["sarflow-flood"]["promoted"] is True
    assert "llp" in summary["skipped"] and "no bags" in summary["skipped"]["llp"]
    assert "skipped          llp" in res.output
    assert 0.0 <= summary["features"]["online_example"]["flood__frac_0"] <= 1.0  # the first label column


# ------------------------------------------------------------------------------ BigEarthNet

@pytest.fixture(scope="module")
def bigearthnet(real_data, tmp_path_factory):
    import rasterio
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping

    d = real_data / "bigearthnet"
    tmp = tmp_path_factory.mktemp("bigearthnet")
    s1, s2, features = [], [], []
    for patch in ("36_85", "4_55"):
        s1_dir = d / f"S1A_IW_GRDH_1SDV_20170617T064724_29UPU_{patch}"
        s2_dir = d / f"S2A_MSIL2A_20170617T113321_{patch}"
        s1.append([str(s1_dir / f"{s1_dir.name}_{b}.tif") for b in ("VV", "VH")])
        s2.append([str(s2_dir / f"{s2_dir.name}_{b}.tif") for b in S2_BANDS])
        with rasterio.open(s2[-1][1]) as ds:
            features.append({"type": "Feature", "properties": {"patch": patch},
                             "geometry": transform_geom(ds.crs, "EPSG:4326", mapping(box(*ds.bounds)))})
    (tmp / "patches.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    catalog = _write(tmp / "catalog.yaml", {
        "grid": {"crs": 32629, "resolution": 10, "chip_size": 24, "aoi": "patches.geojson"},
        "sources": [
            {"name": "sentinel1", "uris": s1, "bands": ["VV", "VH"], "units": "dB", "kind": "continuous"},
            {"name": "sentinel2", "uris": s2, "bands": S2_BANDS, "units": "reflectance", "kind": "continuous",
             "nodata": 0},
        ]})
    return _chain_to_embeddings(catalog, tmp)


def test_bigearthnet_encoder_reads_all_14_bands(bigearthnet):
    import mlflow
    import pyarrow.parquet as pq
    import torch

    mlflow.set_tracking_uri(bigearthnet["uri"])
    encoder = mlflow.pytorch.load_model("models:/sarflow-encoder-mae/1", map_location="cpu")
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.in_channels for c in convs[:1]) == 14 or \
        sum(c.in_channels for c in convs if c.kernel_size == (8, 8)) == 14, [c.in_channels for c in convs]
    files = sorted((bigearthnet["root"] / "embeddings").rglob("*.parquet"))
    table = pq.read_table(files[0])
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(emb).all() and emb.std(axis=0).mean() > 0  # no NaN chip, not one constant vector


def test_bigearthnet_has_no_task_and_says_so(bigearthnet):
    sarflow("features", "labels", bigearthnet["store"], "--features-root", bigearthnet["root"], "--params", bigearthnet["params"],
            ok=False)
    res, _ = _probe(bigearthnet, ok=False)
    assert res.exit_code != 0 and "label" in res.output.lower() and "Traceback" not in res.output
    assert "sarflow-" not in "".join(n for n in _registered(bigearthnet["uri"]) if n != "sarflow-encoder-mae")


# ------------------------------------------------------------------------- CORINE Lausanne

@pytest.fixture(scope="module")
def lausanne(real_data, tmp_path_factory):
    import rasterio

    d = real_data / "corine-lausanne"
    tmp = tmp_path_factory.mktemp("lausanne")
    with rasterio.open(d / "ls100_12.tif") as ref:
        t = ref.transform
    catalog = _write(tmp / "catalog.yaml", {
        "grid": {"crs": 2056, "resolution": float(t.a), "chip_size": 16, "origin": [t.c, t.f]},
        "sources": [
            {"name": "clc_2006", "uris": [str(d / "ls100_06.tif")], "bands": ["code"], "units": "class",
             "kind": "categorical", "role": "input"},
            {"name": "clc_2012", "uris": [str(d / "ls100_12.tif")], "bands": ["code"], "units": "class",
             "kind": "categorical", "legend": "corine"},
        ]})
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    store, root = tmp / "chips.zarr", tmp / "features"
    sarflow("tile", catalog, "--out", store)
    sarflow("features", "labels", store, "--features-root", root, "--params", params)
    return {"store": store, "root": root, "params": params, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "tmp": tmp,
            "label": d / "ls100_12.tif"}


def test_lausanne_tasks_and_labels_come_from_the_corine_legend(lausanne):
    """CLC grid codes with nodata 255 under `legend: corine`: 44 named classes, fractions that sum to 1."""
    import pandas as pd
    import rasterio

    from sarflow.downstream.tasks import store_tasks

    tasks = {t.name: t for t in store_tasks(str(lausanne["store"]))}
    assert set(tasks) == {"clc_2012", "clc_2012_presence"}
    assert len(tasks["clc_2012"].codes) == 44 and "Coniferous forest" in tasks["clc_2012"].class_names
    labels = pd.read_parquet(lausanne["root"] / "labels" / "labels.parquet")
    fractions = labels[tasks["clc_2012"].columns].to_numpy()
    labelled = labels["clc_2012__labelled"].to_numpy() > 0
    assert np.allclose(fractions[labelled].sum(axis=1), 1.0)
    with rasterio.open(lausanne["label"]) as ds:
        codes = set(np.unique(ds.read(1)).tolist()) - {255}
    present = {c for c, col in zip(tasks["clc_2012"].codes, tasks["clc_2012"].columns) if labels[col].sum() > 0}
    assert present <= codes and len(present) >= 10  # classes seen in chips are classes of the raster


def test_lausanne_pretrain_refuses_a_store_whose_inputs_are_all_categorical(lausanne):
    """The only input is a categorical map (CLC 2006): no encoder is trained on class codes as numbers."""
    res = sarflow("pretrain", lausanne["store"], "--params", lausanne["params"], "--tracking-uri", lausanne["uri"],
                  ok=False)
    assert res.exit_code != 0 and "categorical" in res.output and "Traceback" not in res.output
    assert _registered(lausanne["uri"]) == {}


# --------------------------------------------------------------------------- SAR only

def test_sar_only_store_pretrains_and_embeds_and_probes_say_no_label(real_data, tmp_path):
    d = real_data / "sen1floods11"
    catalog = _write(tmp_path / "catalog.yaml", {
        "grid": {"crs": "utm", "resolution": 20, "chip_size": 16},
        "sources": [{"name": "vv_vh", "uris": [str(d / "Spain_7370579_S1Hand.tif")], "bands": ["VV", "VH"],
                     "units": "dB", "kind": "continuous"}]})
    ctx = _chain_to_embeddings(catalog, tmp_path)
    assert list((ctx["root"] / "embeddings").rglob("*.parquet"))
    res, _ = _probe(ctx, ok=False)
    assert res.exit_code != 0 and "label" in res.output.lower() and "Traceback" not in res.output

"""Probes on frozen embeddings: label-efficiency curves with baselines, registration of the best
probe, known-answer checks, MMD, region generalization, modality ablation, bad inputs, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import tiny_features
from sarflow.downstream.probes import (PRIMARY_METRIC, ProbeConfig, fit_probe, load_probe_data, mmd2_rbf,
                                       mmd_permutation_pvalue, registered_task_name, run_ablation,
                                       run_region_generalization, run_probes, score, task_target)
from sarflow.errors import InputError

MODEL = "sarflow-encoder-mae"


@pytest.fixture(scope="module")
def featured(tiny_store, tmp_path_factory):
    """A DVC-versioned tiny store, a registered tiny MAE, its embeddings and labels, applied in Feast."""
    built = tiny_features(tiny_store, tmp_path_factory.mktemp("probes"), MODEL)
    return {**built, "store": str(built["store"]), "root": str(built["root"])}


@pytest.fixture(scope="module")
def probed(featured):
    cfg = ProbeConfig(store=featured["store"], features_root=featured["root"], tracking_uri=featured["uri"],
                      tasks=("landcover", "water"), sizes=(25, 50, 0), draws=2, scratch_epochs=2,
                      out_dir=str(featured["tmp"] / "probe-out"))
    return cfg, run_probes(cfg)


def test_curves_have_every_size_and_draw_and_metrics_are_in_range(probed):
    cfg, r = probed
    curves = pd.read_csv(r["curves"])
    n_all = int(curves.n.max())
    emb = curves[(curves.source == "embeddings") & (curves["split"] == "test")]
    for task, metric in (("landcover", "macro_f1"), ("water", "rmse")):
        for probe in cfg.probes:
            part = emb[(emb.task == task) & (emb.probe == probe) & (emb.metric == metric)]
            assert sorted(part.n.unique()) == [25, 50, n_all]
            assert (part.groupby("n").draw.nunique() == cfg.draws).all()
    assert {"pixel_stats", "scratch"} <= set(curves.source)  # same n for the baselines
    assert set(curves[curves.source == "scratch"].task) == {"landcover"}  # water is not a scratch task
    assert 0 <= r["metrics"]["landcover_test_macro_f1"] <= 1 and 0 <= r["metrics"]["landcover_test_accuracy"] <= 1
    assert 0 <= r["metrics"]["water_test_rmse"] < 1 and np.isfinite(r["metrics"]["water_test_r2"])
    assert all(np.isfinite(v) for k, v in r["metrics"].items() if not k.endswith("_r2"))
    assert all(Path(p).is_file() and Path(p).stat().st_size > 1000 for p in r["plots"]) and len(r["plots"]) == 2
    for task in ("landcover", "water"):
        for baseline, s in r["label_savings"][task].items():
            assert s["n_all"] == n_all and (s["n_to_match"] is None or s["n_to_match"] in (25, 50, n_all))
    assert json.loads(Path(r["json"]).read_text())["run_id"] == r["run_id"]


def test_run_is_logged_with_lineage_and_the_registered_probe_loads_and_predicts(featured, probed):
    import mlflow

    cfg, r = probed
    mlflow.set_tracking_uri(featured["uri"])
    client = mlflow.MlflowClient()
    run = client.get_run(r["run_id"])
    assert run.data.tags["sarflow.dataset_dvc_md5"] == featured["dataset_version"]
    assert run.data.metrics["landcover_test_macro_f1"] == pytest.approx(r["metrics"]["landcover_test_macro_f1"])
    artifacts = {a.path for a in client.list_artifacts(r["run_id"], "downstream")}
    assert {"downstream/curves.csv", "downstream/curve_landcover.png", "downstream/label_savings.json"} <= artifacts

    assert r["models"] == {"sarflow-landcover": "1", "sarflow-water": "1"}
    assert registered_task_name("landcover_presence") == "sarflow-landcover-presence"
    mv = client.get_model_version("sarflow-landcover", "1")
    assert mv.tags["sarflow.eval_set"] == f"{featured['dataset_version']}:{MODEL}:1:test"
    assert mv.tags["sarflow.dataset_dvc_md5"] == featured["dataset_version"] and "sarflow.catalog_hash" in mv.tags
    nested = client.get_run(mv.run_id)
    assert nested.data.tags.get("mlflow.parentRunId") == r["run_id"]
    assert PRIMARY_METRIC["landcover"][0] in nested.data.metrics  # what the promotion gate reads

    data = load_probe_data(featured["store"], featured["root"])
    y, valid = task_target("landcover", data.labels)
    tr, te = valid & (data.split == "train"), valid & (data.split == "test")
    local = fit_probe(r["selected_probe"]["landcover"], "landcover", data.x[tr], y[tr], seed=cfg.seed)
    loaded = mlflow.pyfunc.load_model("models:/sarflow-landcover/1")
    np.testing.assert_array_equal(np.asarray(loaded.predict(data.x[te])), local.predict(data.x[te]))
    assert nested.data.metrics["test_macro_f1"] == pytest.approx(score("landcover", local, data.x[te], y[te])["macro_f1"])


def test_linear_probe_recovers_a_linear_answer():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    w = rng.normal(size=(16, 11))
    logits = x @ w
    frac = np.exp(logits - logits.max(1, keepdims=True))
    labels = pd.DataFrame(frac / frac.sum(1, keepdims=True), columns=[f"frac_{c}" for c in (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)])
    labels["water_fraction"] = 0.5 + 0.05 * (x @ rng.normal(size=16))
    tr, te = np.arange(200), np.arange(200, 300)
    for task, metric, floor in (("landcover", "accuracy", 0.6), ("water", "r2", 0.9)):
        y, valid = task_target(task, labels)
        assert valid.all()
        good = score(task, fit_probe("linear", task, x[tr], y[tr]), x[te], y[te])[metric]
        shuffled = score(task, fit_probe("linear", task, x[tr], rng.permutation(y[tr])), x[te], y[te])[metric]
        assert good > floor and shuffled < floor - 0.3, (task, good, shuffled)
        if task == "landcover":  # well above chance (one over the number of classes)
            assert good > 4 / len(np.unique(y)), good


def test_mmd_is_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    shifted = rng.normal(size=(150, 8)) + 1.0
    same, diff = mmd2_rbf(a, b), mmd2_rbf(a, shifted)
    assert abs(same) < 0.01 and diff > 0.1, (same, diff)
    assert mmd_permutation_pvalue(a, shifted, permutations=50) < 0.05
    assert mmd_permutation_pvalue(a, b, permutations=50) > 0.05


def test_region_generalization_reports_gap_and_shift(featured):
    r = run_region_generalization(featured["store"], featured["root"], featured["uri"], tasks=("landcover", "water"),
                                  out_dir=str(featured["tmp"] / "region"))
    table = pd.read_csv(r["table"])
    assert set(table.train) == {"west", "east"} and set(table.task) == {"landcover", "water"}
    assert np.isfinite(table[["error_in", "error_out", "error_gap", "mmd2", "mean_distance"]].to_numpy()).all()
    np.testing.assert_allclose(table.error_gap, table.error_out - table.error_in, atol=1e-9)


def test_modality_ablation_table(featured):
    r = run_ablation({"clear": featured["store"]}, featured["uri"], out_dir=str(featured["tmp"] / "ablation"))
    table = pd.read_csv(r["table"])
    assert list(table.modalities) == ["sar", "optical", "fused"] and r["features"] == "pixel_stats"
    assert table.landcover_macro_f1.between(0, 1).all() and (table.water_rmse >= 0).all()


def test_bad_inputs_are_clear_errors(featured, tmp_path):
    with pytest.raises(InputError, match="unknown task"):
        run_probes(ProbeConfig(store=featured["store"], features_root=featured["root"], tasks=("landcovr",)))
    with pytest.raises(InputError, match="no embeddings"):
        run_probes(ProbeConfig(store=featured["store"], features_root=str(tmp_path / "empty")))
    root = tmp_path / "nolabels"
    shutil.copytree(Path(featured["root"]) / "embeddings", root / "embeddings")
    with pytest.raises(InputError, match="no chip labels") as e:
        run_probes(ProbeConfig(store=featured["store"], features_root=str(root)))
    assert str(root / "labels") in str(e.value)
    with pytest.raises(InputError, match="not a sarflow chip store"):
        load_probe_data(str(tmp_path / "nostore"), featured["root"])


def test_cli_probe_end_to_end(featured, tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli_downstream import downstream_app

    runner = CliRunner()
    res = runner.invoke(downstream_app, ["probe", featured["store"], "--features-root", featured["root"],
                                         "--tracking-uri", featured["uri"], "--sizes", "25,0", "--draws", "1",
                                         "--task", "water", "--no-baselines", "--no-register", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "water" in res.output and f"json: {tmp_path / 'probes.json'}" in res.output
    out = json.loads((tmp_path / "probes.json").read_text())
    assert out["models"] == {"sarflow-water": None}
    bad = runner.invoke(downstream_app, ["probe", featured["store"], "--features-root", featured["root"],
                                         "--tracking-uri", featured["uri"], "--task", "nope"])
    assert bad.exit_code == 2 and "error:" in bad.output and "unknown task" in bad.output

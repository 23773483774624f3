"""The end-to-end Kubeflow pipeline under kfp.local on a tiny AOI, through `sarflow demo`:
on the embedded default (files, SQLite), and against real servers on 127.0.0.1 (`sarflow
services up`: S3, MLflow server on PostgreSQL, Feast feature server + Redis).

Nothing is mocked: every task is a subprocess running the installed sarflow; the assertions
read the products back the way another user would (zarr, DVC files, MLflow, Feast, HTTP).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

# The pipelines are built when their module is imported, and KFP's resource setters walk the stack
# (inspect.stack) at a cost that grows with the modules loaded: imported here, at collection, before
# the tests load torch, MLflow and Feast, that takes about 18 s of CPU instead of about 55 s.
import pipelines.e2e  # noqa: F401

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "synth": {"size_px": 384, "seed": 5, "chip_size": 32, "cloud_fraction": 0.2},  # 144 chips: enough test chips and bags to measure
    "tile": {"shard_chips": 16, "workers": 2},
    "pretrain": {"method": "mae", "batch_size": 16, "workers": 0,
                 "vit": {"size": "tiny", "patch": 8, "depth": 1, "dim": 32, "heads": 2},
                 "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 3},
                 "methods": {"mae": {"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1}}},
    "downstream": {"sizes": [25, 0], "draws": 2, "scratch_epochs": 1},
    "llp": {"steps": 30, "bag_sizes": [1, 2]},  # a bag-size curve of two points
}


@pytest.fixture(scope="module", autouse=True)
def _project_cwd():
    """`components` and `pipelines` are top-level folders of the project, not installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        mp.chdir(ROOT)
        yield


def _check_products(summary: dict, out: Path) -> None:
    import mlflow
    import zarr

    from sarflow.data.chipstore import open_store

    assert summary["pipeline"]["state"] == "SUCCEEDED"
    # the chip store, readable by zarr, versioned by DVC with the hash the summary reports
    store = Path(summary["store"])
    group = zarr.open_group(str(store), mode="r")
    assert group["s1grd"].shape[0] == open_store(store).n_chips == summary["store_summary"]["chips"] > 0
    md5 = summary["dataset_version"]["dvc_md5"]
    dvc_file = yaml.safe_load(store.with_name(store.name + ".dvc").read_text())
    assert dvc_file["outs"][0]["md5"] == md5
    # MLflow runs with lineage, registered models with champions
    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    for key in ("pretrain_run", "probes_run", "llp_run"):
        tags = client.get_run(summary["mlflow"][key]).data.tags
        assert tags["sarflow.dataset_dvc_md5"] == md5 and tags["sarflow.catalog_hash"], key
    models = summary["mlflow"]["registered_models"]
    for name in ("sarflow-encoder-mae", "sarflow-worldcover", "sarflow-llp-worldcover"):
        assert name in models, sorted(models)
    for name in ("sarflow-worldcover", "sarflow-llp-worldcover"):
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["sarflow.dataset_dvc_md5"] == md5
        assert summary["champions"][name]["champion"] == str(champion.version)
        assert f"models:/{name}@champion" in summary["published"]
    # Feast: views applied, online features served for a chip
    assert any(v.startswith("chip_embeddings_mae_v") for v in summary["features"]["views"])
    assert {"chip_labels", "chip_bags"} <= set(summary["features"]["views"])  # bags written by LLP, then materialized
    example = summary["features"]["online_example"]
    assert len(example["embedding_head"]) == 4 and 0.0 <= example["worldcover__frac_10"] <= 1.0
    hits = summary["features"]["similar_to_first_chip"]
    assert hits[0]["chip_id"] == example["chip_id"]
    # one results-report run gathers this run's probes and LLP tables and plots
    report = client.get_run(summary["results_report"]["run_id"])
    assert report.info.run_name == "results-report"
    assert report.data.tags["sarflow.report.label_efficiency.run_id"] == summary["mlflow"]["probes_run"]
    assert report.data.tags["sarflow.report.llp.run_id"] == summary["mlflow"]["llp_run"]
    page = Path(summary["results_report"]["html"]).read_text()
    assert page.count("<table") == 2 and "data:image/png;base64," in page
    # the report's plots exist, summary.json on disk says the same
    assert Path(summary["plots"]["chips_quicklook"]).is_file()
    assert any(k.startswith("probes/") for k in summary["plots"]) and any(k.startswith("llp/") for k in summary["plots"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["dataset_version"]["dvc_md5"] == md5 and on_disk["champions"].keys() == summary["champions"].keys()


def _check_everything_inside(out: Path, work: Path, tracking_uri: str) -> None:
    """Issue 15: nothing written outside the output folder (the working directory stays empty), and
    every registered model version's files are under it."""
    import mlflow

    assert sorted(p.name for p in work.iterdir()) == [], "written outside the output folder"
    client = mlflow.MlflowClient(tracking_uri)
    versions = [mv for rm in client.search_registered_models() for mv in client.search_model_versions(f"name='{rm.name}'")]
    assert versions
    for mv in versions:
        where = client.get_model_version_download_uri(mv.name, mv.version).removeprefix("file://")
        assert Path(where).resolve().is_relative_to(out.resolve()), (mv.name, mv.version, where)


@pytest.mark.timeout(900)
def test_demo_runs_the_end_to_end_pipeline_under_kfp_local(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "demo"
    work = tmp_path / "cwd"  # the user's working directory: nothing may land here
    work.mkdir()
    monkeypatch.chdir(work)
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--params", str(params)])
    assert res.exit_code == 0, res.output[-4000:]
    assert "sarflow-worldcover v1 @champion=v1; gate promoted: test_macro_f1" in res.output and "summary:" in res.output
    assert "executor_input" not in res.output and "[1/" in res.output  # one line per task; the rest in logs/
    assert "learned?       final loss" in res.output and "for the trivial predictor" in res.output
    assert "probe worldcover" in res.output and "label saving:" in res.output
    assert len(res.output.splitlines()) <= 60, res.output
    assert any((out / "logs").glob("pretrain*.log"))
    summary = json.loads((out / "summary.json").read_text())
    _check_products(summary, out)
    assert summary["dvc"]["pushed"] is True and Path(summary["dvc"]["remote"]).is_dir()
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"

    # `make results` on top of the demo: every other section joins one results report
    reports = []
    # a second time (one section: --only) replaces its products and reports the newer run beside the others' newest
    for only in ([], ["--only", "modality_ablation"]):
        (out / "results" / "ablation" / "stale").mkdir(parents=True, exist_ok=True)
        done = CliRunner().invoke(app, ["results", "--out", str(out), "--real-data", str(tmp_path / "no-real-data"),
                                        *only])
        assert done.exit_code == 0, done.output[-3000:]
        assert ("the real LLP case is left out" in done.output) == (not only)  # llp_real was asked for the first time
        assert not (out / "results" / "ablation" / "stale").exists()  # the section's folder is made afresh
        reports.append(json.loads((out / "results" / "report.json").read_text()))
    first, report = reports
    assert first["run_id"] != report["run_id"]
    assert first["sections"]["modality_ablation"] != report["sections"]["modality_ablation"]
    for kept in ("segmentation", "region_generalization"):  # sections not run again: the same newest runs
        assert first["sections"][kept] == report["sections"][kept] and report["sections"][kept], kept
    assert any((out / "results" / "regions").iterdir())  # and their products are kept
    assert first["missing"] == report["missing"] == ["llp_real"], report
    assert report["sections"]["label_efficiency"] == [summary["mlflow"]["probes_run"]]
    assert report["sections"]["llp"] == [summary["mlflow"]["llp_run"]]
    assert Path(report["html"]).read_text().count("<table") == 5
    _check_everything_inside(out, work, summary["mlflow"]["tracking_uri"])


def test_results_refuses_an_unknown_section_before_running_any(tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    res = CliRunner().invoke(app, ["results", "--out", str(tmp_path), "--only", "modality_ablation", "--only", "nope"])
    assert res.exit_code == 2 and "nope: no such results section" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def _postgres_and_redis_or_skip() -> None:
    for port, what in ((5432, "PostgreSQL (MLflow's backend store)"), (6379, "Redis (Feast's online store)")):
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                pytest.skip(f"no {what} on 127.0.0.1:{port}: the services mode needs it")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_services_mode_runs_the_same_pipeline_against_servers(tmp_path):
    import requests

    from pipelines import demo_pipeline
    from sarflow.local.demo import run_demo
    from sarflow.local.services import read_state, services_down, services_up
    from sarflow.params import environ
    from sarflow.data.storage import minio_client

    _postgres_and_redis_or_skip()
    state_dir = tmp_path / "services"
    state = services_up(state_dir)
    try:
        assert read_state(state_dir)["mlflow"]["url"] == state["mlflow"]["url"]
        summary = run_demo(tmp_path / "demo", demo_pipeline(on_catalog=False), TINY, services=state)
        _check_products(summary, tmp_path / "demo")
        assert summary["mlflow"]["tracking_uri"] == state["mlflow"]["url"]
        assert summary["features"]["root"].startswith("s3://")
        with environ(state["env"]):  # the DVC remote, MLflow's artifacts and the features are in S3
            s3 = minio_client()
            for bucket in ("sarflow-dvc", "sarflow-mlflow", "sarflow-features"):
                assert any(True for _ in s3.list_objects(bucket, recursive=True)), bucket
        # the Feast feature server answers for a chip, from Redis
        view = next(v for v in summary["features"]["views"] if v.startswith("chip_embeddings_"))
        chip = summary["features"]["online_example"]["chip_id"]
        r = requests.post(state["feast"]["url"] + "/get-online-features", timeout=30,
                          json={"features": [f"{view}:embedding"], "entities": {"chip_id": [chip]}})
        assert r.status_code == 200, r.text
        values = r.json()["results"][1]["values"][0]
        assert values[:4] == pytest.approx(summary["features"]["online_example"]["embedding_head"], rel=1e-5)
    finally:
        stopped = services_down(state_dir)
    assert stopped == {"feast": True, "mlflow": True, "s3": True}
    assert not (state_dir / "services.json").exists()

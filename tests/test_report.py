"""The results report: one MLflow run gathering the newest probes, ablation, region and
segmentation runs (LLP never run here, so reported missing), read back by another reader."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from helpers import tiny_features
from sarflow.downstream.results_report import REPORT_RUN, build_results_report
from sarflow.errors import InputError

MODEL = "sarflow-encoder-mae"


@pytest.fixture(scope="module")
def produced(tiny_store, tmp_path_factory):
    """Probes, ablation, region and segmentation runs on the tiny store, all in one MLflow db."""
    from sarflow.downstream.ablation import run_ablation
    from sarflow.downstream.probes import ProbeConfig, run_probes
    from sarflow.downstream.region import run_region_generalization
    from sarflow.downstream.segmentation.config import SegmentConfig
    from sarflow.downstream.segmentation.run import run_segmentation

    built = tiny_features(tiny_store, tmp_path_factory.mktemp("report"), MODEL)
    store, root, uri, tmp = str(built["store"]), str(built["root"]), built["uri"], built["tmp"]
    probes = run_probes(ProbeConfig(store=store, features_root=root, tracking_uri=uri, tasks=("worldcover",),
                                    sizes=(25, 0), draws=1, scratch_steps=10, register=False, out_dir=str(tmp / "p")))
    ablation = run_ablation({"clear": store}, uri, out_dir=str(tmp / "a"))
    region = run_region_generalization(store, root, uri, tasks=("worldcover",), out_dir=str(tmp / "r"))
    seg = run_segmentation(SegmentConfig(store=store, tracking_uri=uri, encoder_uri=f"models:/{MODEL}/1", steps=3,
                                         batch_size=16, threads=1, register=False))
    report = build_results_report(uri, out_dir=str(tmp / "out"))
    return {**built, "probes": probes, "ablation": ablation, "region": region, "seg": seg, "report": report}


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images = 0, []

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_run_points_at_the_newest_source_runs_and_lists_what_is_missing(produced):
    import mlflow

    r = produced["report"]
    assert r["sections"]["label_efficiency"] == [produced["probes"]["run_id"]]
    assert r["sections"]["modality_ablation"] == [produced["ablation"]["run_id"]]
    assert r["sections"]["region_generalization"] == [produced["region"]["run_id"]]
    assert set(r["sections"]["segmentation"]) == {produced["seg"]["vit"]["run_id"], produced["seg"]["unet"]["run_id"]}
    assert r["missing"] == ["llp", "llp_real"]

    client = mlflow.MlflowClient(produced["uri"])
    run = client.get_run(r["run_id"])
    assert run.info.run_name == REPORT_RUN and run.info.status == "FINISHED"
    assert run.data.tags["sarflow.report.modality_ablation.run_id"] == produced["ablation"]["run_id"]
    assert run.data.tags["sarflow.report.missing"] == "llp,llp_real"
    # lineage: the dataset every source was computed on, and the code that built the report
    assert run.data.tags["sarflow.dataset_dvc_md5"] == produced["dataset_version"]
    assert run.data.tags["sarflow.catalog_hash"] and run.data.tags["sarflow.code_commit"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=r["run_id"], dst_path=str(produced["tmp"] / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"report/report.md", "report/report.html", "report/sources.json", "report/tables/label_efficiency.csv",
            "report/tables/modality_ablation.csv", "report/tables/region_generalization.csv",
            "report/tables/segmentation.csv", "report/plots/label_efficiency/curve_worldcover.png"} <= files
    assert any(f.startswith("report/plots/segmentation/") and f.endswith(".png") for f in files)
    md = (local / "report" / "report.md").read_text()
    assert "Not run yet. Produce it with `sarflow llp train STORE`" in md and produced["probes"]["run_id"] in md
    assert json.loads((local / "report" / "sources.json").read_text()) == r["sections"]


def test_report_tables_agree_with_their_sources(produced):
    from sarflow.downstream.label_efficiency import format_figure, format_saving

    out = Path(produced["report"]["markdown"]).parent
    ablation = pd.read_csv(out / "tables" / "modality_ablation.csv")
    pd.testing.assert_frame_equal(ablation, pd.read_csv(produced["ablation"]["table"]))
    seg = pd.read_csv(out / "tables" / "segmentation.csv").set_index("model")
    for kind in ("vit", "unet"):
        assert seg.loc[kind, "test_miou"] == pytest.approx(produced["seg"][kind]["test_miou"])
    region = pd.read_csv(out / "tables" / "region_generalization.csv")
    assert region.error_gap.tolist() == pytest.approx([row["error_gap"] for row in produced["region"]["rows"]])

    eff = pd.read_csv(out / "tables" / "label_efficiency.csv", dtype=str)
    assert set(eff.columns) >= {"task", "metric", "features", "n=25", "all"}
    pixel = eff[eff.features.str.startswith("pixel_stats")].iloc[0]
    saving = produced["probes"]["label_savings"]["worldcover"]["pixel_stats"]
    assert pixel.features == f"pixel_stats ({saving['baseline_probe']})"
    assert pixel["all"] == format_figure(saving["baseline_all"], saving["baseline_ci"])  # mean [95% block interval]
    assert set(eff.features) >= {"embeddings", "scratch (cnn)"} and any(f.startswith("random_init (") for f in eff.features)
    # one number per task: the report's embeddings figure at n = all is the probes run's primary figure
    emb = eff[eff.features == "embeddings"].iloc[0]
    primary = produced["probes"]["primary"]["worldcover"]
    assert emb["all"] == format_figure(primary["value"], primary["ci"]) and "[" in emb["all"]
    assert pixel["label saving (embeddings)"] == format_saving(saving)


def test_html_report_is_self_contained(produced):
    parser = _Tables()
    parser.feed(Path(produced["report"]["html"]).read_text())
    assert parser.tables == 4  # one per section found
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)


def test_a_newer_run_replaces_the_older_one_in_the_next_report(produced):
    from sarflow.downstream.ablation import run_ablation

    again = run_ablation({"clear": str(produced["store"])}, produced["uri"], out_dir=str(produced["tmp"] / "a2"))
    r = build_results_report(produced["uri"], out_dir=str(produced["tmp"] / "out2"))
    assert r["sections"]["modality_ablation"] == [again["run_id"]] and r["run_id"] != produced["report"]["run_id"]
    # report runs are never read as sources, and a source filter limits where runs are looked for
    only = build_results_report(produced["uri"], experiments=["sarflow-segmentation"], out_dir=str(produced["tmp"] / "o3"))
    assert only["missing"] == ["label_efficiency", "modality_ablation", "region_generalization", "llp", "llp_real"]


def test_pinned_runs_report_exactly_those_runs(produced, tmp_path):
    probes, ablation = produced["probes"]["run_id"], produced["ablation"]["run_id"]
    r = build_results_report(produced["uri"], run_ids={"label_efficiency": [probes]}, out_dir=str(tmp_path / "p"))
    assert r["sections"] == {"label_efficiency": [probes]} and r["missing"] == []
    md = Path(r["markdown"]).read_text()
    assert "Label efficiency" in md and "Modality ablation" not in md
    with pytest.raises(InputError, match="is not a label_efficiency run") as e:
        build_results_report(produced["uri"], run_ids={"label_efficiency": [ablation]}, out_dir=str(tmp_path / "k"))
    assert e.value.where == ablation
    with pytest.raises(InputError, match="no such MLflow run"):
        build_results_report(produced["uri"], run_ids={"llp": ["0" * 32]}, out_dir=str(tmp_path / "n"))
    with pytest.raises(InputError, match="run ids must be given per section"):
        build_results_report(produced["uri"], run_ids={"probes": [probes]}, out_dir=str(tmp_path / "s"))
    assert not (tmp_path / "k").exists() and not (tmp_path / "n").exists()


def test_bad_requests_write_nothing(produced, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(produced["uri"])
    before = len(client.search_runs([client.get_experiment_by_name("sarflow-reports").experiment_id]))
    with pytest.raises(InputError, match=r"sections never run: llp \(sarflow llp train STORE\)"):
        build_results_report(produced["uri"], strict=True, out_dir=str(tmp_path / "strict"))
    with pytest.raises(InputError, match=r"no experiment\(s\) \['nope'\]"):
        build_results_report(produced["uri"], experiments=["nope"], out_dir=str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no downstream runs to report on"):
        build_results_report(f"sqlite:///{tmp_path / 'empty.db'}", out_dir=str(tmp_path / "empty"))
    assert len(client.search_runs([client.get_experiment_by_name("sarflow-reports").experiment_id])) == before
    assert not any(tmp_path.glob("*/report.json"))


def test_cli_report(produced, tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.downstream import downstream_app

    runner = CliRunner()
    res = runner.invoke(downstream_app, ["report", "--tracking-uri", produced["uri"], "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "llp                   not run yet (sarflow llp train STORE)" in res.output
    assert f"report: {tmp_path / 'report' / 'report.md'}" in res.output
    bad = runner.invoke(downstream_app, ["report", "--tracking-uri", produced["uri"], "--strict",
                                         "--out", str(tmp_path / "strict")])
    assert bad.exit_code == 2 and "error:" in bad.output and "sections never run" in bad.output
    assert not (tmp_path / "strict").exists()


def test_results_command_refuses_a_folder_without_a_demo(tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    res = CliRunner().invoke(app, ["results", "--out", str(tmp_path)])
    assert res.exit_code == 2 and f"{tmp_path / 'summary.json'}: no finished demo here" in res.output
    assert list(tmp_path.iterdir()) == []

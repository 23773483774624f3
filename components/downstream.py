"""Components `train-probes` and `train-llp`: the downstream models on frozen embeddings and
the learning-from-label-proportions models, tracked in MLflow and registered as
``sarflow-<task>``; and `report-results`: one MLflow run gathering both runs' tables and plots.

Thin wrappers over :func:`sarflow.downstream.probes.run_probes` (linear / kNN / MLP probes,
label-efficiency curves against raw-pixel and from-scratch baselines) and
:func:`sarflow.downstream.llp.run.run_llp` (bags from polygons x chips, proportions from a
statistics table; instance classifiers, KDM and a strided convolution). Training sets come
from Feast under ``features_root``. ``options`` are the library config's keyword arguments
(params.yaml's ``downstream:`` / ``llp:`` sections).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def train_probes(
    store: Input[Dataset],
    embeddings: Input[Dataset],
    probes_report: Output[Artifact],
    metrics: Output[Metrics],
    features_root: str,
    tracking_uri: str = "",
    options: dict = {},
    dataset_version: str = "",
    dataset_git_commit: str = "",
) -> NamedTuple("Probes", [("run_id", str), ("models", str)]):
    """Probes + label-efficiency curves; registers the best probe per evaluable task. `models`:
    JSON {name: {version, metric, higher_is_better}} of what it registered (the gate's input).
    `dataset_version`/`dataset_git_commit`: the version task's outputs, the runs' lineage by value."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components.paths import absolute, absolute_uri
    from sarflow.data.chipstore import label_sources, open_chip_group
    from sarflow.downstream.probes import ProbeConfig, run_probes
    from sarflow.mlops.lineage import given_lineage
    from sarflow.mlops.tracking import flat_metrics
    from sarflow.params import Params, stage_config

    features_root, tracking_uri = absolute(features_root), absolute_uri(tracking_uri)
    out = namedtuple("Probes", ["run_id", "models"])
    if not label_sources(open_chip_group(store.path), store.path):
        reason = "skipped: the catalog declares no label source (a source with classes, a legend or a range)"
        print(f"train-probes {reason}")
        Path(probes_report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(probes_report.path).write_text(json.dumps({"run_id": "", "models": {}, "skipped": reason}, indent=1))
        Path(metrics.path).write_text("{}")
        return out("", "{}")
    described = json.loads(Path(embeddings.path).read_text())
    cfg = stage_config(ProbeConfig, Params({"downstream": options}, "pipeline parameter downstream"), "downstream",
                       {"tracking_uri": tracking_uri or None}, store=store.path, features_root=features_root,
                       model=described["model"], version=str(described["version"]))
    with given_lineage(dataset_version, dataset_git_commit):
        result = run_probes(cfg)
    Path(probes_report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(probes_report.path).write_text(json.dumps(result, indent=1, default=str))
    probes_report.metadata.update({"run_id": result["run_id"], "models": result["models"]})
    for key, value in flat_metrics(result["metrics"]).items():
        metrics.log_metric(key, value)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return out(result["run_id"], json.dumps(result["models"]))


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def train_llp(
    store: Input[Dataset],
    embeddings: Input[Dataset],
    bags: Input[Dataset],
    llp_report: Output[Artifact],
    metrics: Output[Metrics],
    features_root: str,
    tracking_uri: str = "",
    polygons_file: str = "municipalities.geojson",
    stats_file: str = "municipality_stats.csv",
    id_column: str = "muni_id",
    options: dict = {},
    dataset_version: str = "",
    dataset_git_commit: str = "",
) -> NamedTuple("LLP", [("run_id", str), ("models", str)]):
    """LLP from bag statistics: `bags` is a folder with the polygons and the statistics table.
    Without them (a catalog that declares no bags) the task is skipped: run_id "" and no models.
    `models`: JSON {name: {version, metric, higher_is_better}} of what it registered.
    `dataset_version`/`dataset_git_commit`: the version task's outputs, the runs' lineage by value."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components.paths import absolute, absolute_uri
    from sarflow.downstream.llp.config import LLPConfig
    from sarflow.downstream.llp.run import run_llp
    from sarflow.mlops.lineage import given_lineage
    from sarflow.mlops.tracking import flat_metrics
    from sarflow.params import Params, stage_config

    features_root, tracking_uri = absolute(features_root), absolute_uri(tracking_uri)
    out = namedtuple("LLP", ["run_id", "models"])
    missing = [f for f in (polygons_file, stats_file) if not (Path(bags.path) / f).is_file()]
    if missing:
        reason = f"skipped: no bags ({', '.join(missing)} not in {bags.path})"
        print(f"train-llp {reason}")
        Path(llp_report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(llp_report.path).write_text(json.dumps({"run_id": "", "models": {}, "skipped": reason}, indent=1))
        Path(metrics.path).write_text("{}")
        return out("", "{}")
    described = json.loads(Path(embeddings.path).read_text())
    cfg = stage_config(LLPConfig, Params({"llp": {"id_column": id_column, **options}}, "pipeline parameter llp"), "llp",
                       {"tracking_uri": tracking_uri or None},
                       store=store.path, polygons=str(Path(bags.path) / polygons_file),
                       stats=str(Path(bags.path) / stats_file), features_root=features_root,
                       model=described["model"], version=str(described["version"]))
    with given_lineage(dataset_version, dataset_git_commit):
        result = run_llp(cfg)
    Path(llp_report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(llp_report.path).write_text(json.dumps(result, indent=1, default=str))
    llp_report.metadata.update({"run_id": result["run_id"], "outside": int(result.get("outside", 0))})
    for key, value in flat_metrics(result["metrics"]).items():
        metrics.log_metric(key, value)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return out(result["run_id"], json.dumps(result["models"]))


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def report_results(
    report_html: Output[HTML],
    tracking_uri: str = "",
    probes_run_id: str = "",
    llp_run_id: str = "",
) -> str:
    """The results report of this pipeline run's probes and LLP runs (a `results-report` MLflow
    run); `report_html` is its self-contained HTML, shown by the Kubeflow UI. Returns the run id."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.paths import absolute_uri
    from sarflow.downstream.results_report import build_results_report
    from sarflow.params import default_tracking_uri

    tracking_uri = absolute_uri(tracking_uri)
    run_ids = {k: [v] for k, v in (("label_efficiency", probes_run_id), ("llp", llp_run_id)) if v}
    if not run_ids:  # both stages skipped (a catalog without labels): nothing to report, and the page says so
        Path(report_html.path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_html.path).write_text("<html><body><h1>sarflow results report</h1><p>No downstream run to report "
                                          "on: the probes and LLP stages were skipped (see their reports).</p></body></html>")
        report_html.metadata.update({"run_id": "", "sections": {}})
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        result = build_results_report(tracking_uri or default_tracking_uri(), run_ids=run_ids,
                                      out_dir=tmp)
        Path(report_html.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["html"], report_html.path)
    report_html.metadata.update({"run_id": result["run_id"], "sections": result["sections"]})
    return result["run_id"]

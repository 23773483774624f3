"""One MLflow run that gathers the downstream results: label-efficiency curves with their
baselines, the modality ablation, region generalization, segmentation and LLP (synthetic and
real), each read back from the newest finished run that produced it.

`build_results_report(tracking_uri)` finds, across the tracking server's experiments, the
newest FINISHED run of each kind (by run name: `probes`, `modality-ablation`,
`region-generalization`, `segmentation-vit` + `segmentation-unet`, `llp-<task>`,
`llp-real-<case>`), downloads its tables and plots, and logs one `results-report` run with:

- `report/report.md` and a self-contained `report/report.html` (plots embedded), every table
  with its source run, experiment, start time and dataset version;
- `report/tables/<section>.csv` and `report/plots/<section>/*.png`;
- a tag `sarflow.report.<section>.run_id` per section found, and one listing what is missing
  (with the command that produces it).

A section that was never run is reported as missing, not silently dropped; `strict=True`
refuses to write anything while a section is missing.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sarflow.errors import InputError

REPORT_RUN = "results-report"
# the dataset lineage a report run carries: every value its sources have, comma-separated
SOURCE_LINEAGE = ("sarflow.dataset_dvc_md5", "sarflow.dataset_git_commit", "sarflow.catalog_hash",
                  "sarflow.dataset_sha256", "sarflow.dataset")
PLOT_SUFFIXES = (".png",)


@dataclass(frozen=True)
class SourceRun:
    run_id: str
    run_name: str
    experiment: str
    started: str
    dataset_version: str
    artifacts: Path  # local copy of the run's artifacts
    lineage: dict  # the run's dataset lineage tags (SOURCE_LINEAGE)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    run_names: tuple[str, ...]  # exact run names; a trailing '*' is a prefix
    exclude_prefix: str | None  # a prefix the run name must not have (llp-real- under llp-*)
    table: Callable[[list[SourceRun]], pd.DataFrame]
    plots: str  # artifact folder whose plots are copied
    command: str  # how to produce the section


def label_efficiency(runs: list[SourceRun]) -> pd.DataFrame:
    """The probes run's label-efficiency table, for the tasks it logged (downstream/tasks.json:
    their primary metric and its direction, as the store's labels declared them): each figure
    with its 95 % interval over test blocks (mean ± std for a run logged before intervals), the
    `all` column of the embeddings row being the task's one primary figure, and the label saving
    against each baseline."""
    from sarflow.downstream.label_efficiency import label_efficiency_table, tasks_from_json

    from sarflow.downstream.tasks import Task

    folder = runs[0].artifacts / "downstream"
    summary = pd.read_csv(folder / "curves_summary.csv")
    tasks_file = folder / "tasks.json"
    if tasks_file.is_file():
        tasks = tasks_from_json(json.loads(tasks_file.read_text())["tasks"])
    else:  # a run of an older sarflow: each task's primary metric from the metrics it has
        tasks = []
        for name in summary.task.unique():
            have = set(summary[summary.task == name].metric)
            kind, metric = next(((k, m) for k, m in (("multiclass", "macro_f1"), ("multilabel", "map"),
                                                     ("regression", "rmse")) if m in have), (None, None))
            if kind:
                tasks.append(Task(str(name), str(name), kind, metric, metric != "rmse"))
    return label_efficiency_table(summary, tasks)


def _csv_table(path: str, columns: tuple[str, ...] = ()) -> Callable[[list[SourceRun]], pd.DataFrame]:
    def read(runs: list[SourceRun]) -> pd.DataFrame:
        table = pd.read_csv(runs[0].artifacts / path)
        keep = [c for c in columns if c in table.columns]
        return table[keep] if keep else table
    return read


def segmentation_table(runs: list[SourceRun]) -> pd.DataFrame:
    """Test mIoU and pixel accuracy of each segmentation model next to the majority class."""
    import mlflow

    client = mlflow.MlflowClient()
    rows = []
    for r in runs:
        run = client.get_run(r.run_id)
        m = run.data.metrics
        rows.append({"model": r.run_name.removeprefix("segmentation-"), "test_miou": m.get("test_miou"),
                     "test_pixel_accuracy": m.get("test_pixel_accuracy"),
                     "majority_class_miou": m.get("baseline_majority_miou"),
                     "trainable_params": run.data.params.get("trainable_params")})
    return pd.DataFrame(rows)


SECTIONS = (
    Section("label_efficiency", "Label efficiency: probes on frozen embeddings vs baselines", ("probes",), None,
            label_efficiency, "downstream", "sarflow downstream probe STORE"),
    Section("modality_ablation", "Modality ablation: SAR vs optical vs fused, clear and clouded", ("modality-ablation",),
            None, _csv_table("downstream/modality_ablation.csv"), "downstream", "sarflow downstream ablation --synth DIR"),
    Section("region_generalization", "Region generalization: error gap next to the embedding shift",
            ("region-generalization",), None,
            _csv_table("downstream/region_generalization.csv",
                       ("train", "test_out", "task", "probe", "metric", "in_region", "out_region",
                        "error_in", "error_out", "error_gap", "mmd2", "mmd_pvalue", "mean_distance")),
            "downstream", "sarflow downstream region STORE"),
    Section("segmentation", "Segmentation: ViT head vs U-Net from scratch (test mIoU, nodata excluded)",
            ("segmentation-vit", "segmentation-unet"), None, segmentation_table, "figures", "sarflow segment train STORE"),
    Section("llp", "Learning from label proportions (synthetic bags)", ("llp-*",), "llp-real-",
            _csv_table("llp/llp_results.csv"), "llp", "sarflow llp train STORE"),
    Section("llp_real", "Learning from label proportions (real case)", ("llp-real-*",), None,
            _csv_table("llp/llp_results.csv"), "llp", "sarflow llp real-case"),
)


def _matches(section: Section, run_name: str) -> bool:
    if section.exclude_prefix and run_name.startswith(section.exclude_prefix):
        return False
    return any(run_name.startswith(n[:-1]) if n.endswith("*") else run_name == n for n in section.run_names)


def _newest_run(client, experiment_ids: list[str], section: Section, name: str):
    if name.endswith("*"):
        query = f"attributes.run_name LIKE '{name[:-1]}%' AND attributes.status = 'FINISHED'"
    else:
        query = f"attributes.run_name = '{name}' AND attributes.status = 'FINISHED'"
    runs = client.search_runs(experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=50)
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and _matches(section, r.info.run_name)]
    return runs[0] if runs else None


def _pinned_runs(client, section: Section, run_ids: list[str]) -> list:
    """The given runs, checked: they exist, finished, and are runs of this section's kind."""
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise InputError(run_id, f"no such MLflow run (given for the {section.key} section)") from None
        if run.info.status != "FINISHED":
            raise InputError(run_id, f"run {run.info.run_name!r} is {run.info.status}, not FINISHED")
        if not _matches(section, run.info.run_name):
            raise InputError(run_id, f"run {run.info.run_name!r} is not a {section.key} run "
                                     f"(expected {' or '.join(section.run_names)})")
        runs.append(run)
    return runs


def find_sources(client, experiment_ids: list[str], section: Section, tmp: Path,
                 run_ids: list[str] | None = None) -> list[SourceRun] | None:
    """The section's runs (`run_ids`, or else the newest finished top-level run per run name of
    `section`), their artifacts downloaded; None when a run name has none."""
    import mlflow

    if run_ids is not None:
        runs = _pinned_runs(client, section, run_ids)
    else:
        runs = [_newest_run(client, experiment_ids, section, name) for name in section.run_names]
        if any(r is None for r in runs):
            return None
    found = []
    for run in runs:
        local = tmp / run.info.run_id
        local.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(local))
        found.append(SourceRun(run.info.run_id, run.info.run_name, client.get_experiment(run.info.experiment_id).name,
                               datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               run.data.tags.get("sarflow.dataset_dvc_md5") or run.data.tags.get("sarflow.dataset_sha256", "–"),
                               local, {k: run.data.tags[k] for k in SOURCE_LINEAGE if k in run.data.tags}))
    return found


def markdown_table(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if not np.isfinite(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _provenance(sources: list[SourceRun]) -> str:
    return "; ".join(f"run `{s.run_id}` ({s.run_name}, experiment {s.experiment}, {s.started}, dataset {s.dataset_version})"
                     for s in sources)


WIDE_PX = 700  # a plot at least this wide (pixels) is shown at the page's full width, a smaller one at its own size


def _png_width(path: Path) -> int:
    """A PNG's width in pixels from its header (0 when it is not a PNG)."""
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _html(title: str, parts: list[tuple[Section, list[SourceRun] | None, pd.DataFrame | None, list[Path]]]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%;height:auto;display:block;margin:8px 0}img.wide{width:100%}</style>",
           f"</head><body><h1>{html.escape(title)}</h1>"]
    for section, sources, table, plots in parts:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        if sources is None:
            out.append(f"<p><b>Not run yet.</b> Produce it with <code>{html.escape(section.command)}</code>.</p>")
            continue
        out.append(f"<p><small>{html.escape(_provenance(sources))}</small></p>")
        out.append(table.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0))
        for p in plots:
            data = base64.b64encode(p.read_bytes()).decode()
            wide = " class='wide'" if _png_width(p) >= WIDE_PX else ""  # maps and multi-panel figures: the page's width
            out.append(f"<img{wide} alt='{html.escape(p.name)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def _report_lineage(sources: list[SourceRun]) -> dict[str, str]:
    """Lineage tags of the report run: every dataset its sources were computed on (values of
    one key comma-separated) and the code that built the report."""
    from sarflow import __version__
    from sarflow.mlops.lineage import code_commit

    tags = {k: ",".join(sorted({s.lineage[k] for s in sources if k in s.lineage}))[:5000] for k in SOURCE_LINEAGE}
    return {**{k: v for k, v in tags.items() if v}, "sarflow.code_version": __version__, "sarflow.code_commit": code_commit()}


def build_results_report(tracking_uri: str, experiments: list[str] | None = None,
                         experiment: str = "sarflow-reports", out_dir: str | None = None, strict: bool = False,
                         run_ids: dict[str, list[str]] | None = None) -> dict:
    """Gathers every downstream section into one `results-report` MLflow run (see the module
    docstring); `experiments` limits where source runs are looked for (default: all).

    `run_ids` ({section: [run id, ...]}) reports exactly those runs and only those sections
    (what a pipeline run produced), instead of the newest run of every section."""
    import mlflow

    from sarflow.mlops.lineage import code_commit
    from sarflow.mlops.tracking import setup_mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    known = {e.name: e.experiment_id for e in client.search_experiments()}
    if experiments:
        unknown = [e for e in experiments if e not in known]
        if unknown:
            raise InputError(tracking_uri, f"no experiment(s) {unknown} on this tracking server (it has {sorted(known)})")
        ids = [known[e] for e in experiments]
    else:
        ids = [i for name, i in known.items() if name != experiment]
    sections = SECTIONS
    if run_ids is not None:
        unknown = sorted(set(run_ids) - {s.key for s in SECTIONS})
        if unknown or not run_ids:
            raise InputError(str(unknown or "{}"), f"run ids must be given per section, one of {[s.key for s in SECTIONS]}")
        sections = tuple(s for s in SECTIONS if s.key in run_ids)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-report-"))
    with tempfile.TemporaryDirectory() as tmp:
        found = {s.key: find_sources(client, ids, s, Path(tmp), (run_ids or {}).get(s.key)) if ids or run_ids else None
                 for s in sections}
        missing = [s.key for s in sections if found[s.key] is None]
        if strict and missing:
            raise InputError(tracking_uri, "sections never run: " + ", ".join(
                f"{s.key} ({s.command})" for s in sections if s.key in missing))
        if len(missing) == len(sections):
            raise InputError(tracking_uri, "no downstream runs to report on: run probes, ablation, region, segmentation "
                                           "or LLP first")
        staging = Path(tmp) / "report"
        (staging / "tables").mkdir(parents=True)
        parts, md = [], ["# sarflow results report", "",
                         f"Tracking server `{tracking_uri}`; code commit `{code_commit()}`; "
                         f"built {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.", ""]
        for section in sections:
            sources = found[section.key]
            md += [f"## {section.title}", ""]
            if sources is None:
                md += [f"Not run yet. Produce it with `{section.command}`.", ""]
                parts.append((section, None, None, []))
                continue
            table = section.table(sources)
            table.to_csv(staging / "tables" / f"{section.key}.csv", index=False)
            plot_dir = staging / "plots" / section.key
            plot_dir.mkdir(parents=True)
            plots = []
            for f in sorted((sources[0].artifacts / section.plots).glob("*")):
                if f.suffix in PLOT_SUFFIXES:
                    plots.append(Path(shutil.copy2(f, plot_dir / f.name)))
            md += [f"Source: {_provenance(sources)}.", "", markdown_table(table), ""]
            md += [f"![{p.stem}](plots/{section.key}/{p.name})" for p in plots] + [""]
            parts.append((section, sources, table, plots))
        (staging / "report.md").write_text("\n".join(md))
        (staging / "report.html").write_text(_html("sarflow results report", parts))
        sources_json = {k: [s.run_id for s in v] if v else None for k, v in found.items()}
        (staging / "sources.json").write_text(json.dumps(sources_json, indent=1))
        exp_id = setup_mlflow(tracking_uri, experiment)
        tags = {f"sarflow.report.{k}.run_id": ",".join(v) for k, v in sources_json.items() if v}
        tags["sarflow.report.missing"] = ",".join(missing) or "none"
        tags.update(_report_lineage([s for v in found.values() if v for s in v]))
        with mlflow.start_run(experiment_id=exp_id, run_name=REPORT_RUN, tags=tags) as run:
            mlflow.log_artifacts(str(staging), artifact_path="report")
        if out.exists():
            shutil.rmtree(out / "report", ignore_errors=True)
        shutil.copytree(staging, out / "report")
    result = {"run_id": run.info.run_id, "sections": sources_json, "missing": missing,
              "markdown": str(out / "report" / "report.md"), "html": str(out / "report" / "report.html")}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    result["json"] = str(out / "report.json")
    return result

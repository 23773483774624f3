"""The demo: the end-to-end Kubeflow pipeline, run here with kfp.local on the embedded default.

synthetic AOI (or your catalog) -> ingest -> chip store -> DVC version (local remote) ->
pretraining tracked in MLflow (SQLite) and registered -> embeddings -> Feast (SQLite online
store) + similarity index -> probes with label-efficiency curves and LLP from municipality
statistics -> the promotion gate -> the champion published. Everything lives in the output
folder; the report printed at the end and ``summary.json`` hold the same facts: where the
store, runs, registered models, champions and feature views are, key metrics and plots.

With ``services`` (a state folder of `sarflow services up`), the same pipeline targets the
servers on 127.0.0.1 instead: MLflow server (PostgreSQL + S3 artifacts), features and the DVC
remote on the S3 server, Feast's online store on Redis.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow

from sarflow.errors import InputError
from sarflow.mlops.kfp_runner import LocalRun, arguments_from_params, run_local
from sarflow.local.services import pipeline_arguments
from sarflow.params import environ

FIGURE_SUFFIXES = (".png",)


def demo_arguments(pipeline, out: Path, params: dict, catalog: Path | None, services: dict | None,
                   overrides: dict) -> dict:
    """The arguments of the demo's pipeline (end to end on a synthetic scene, or on `catalog`:
    the door chooses, ``pipelines.demo_pipeline``) for a demo in `out`."""
    args = arguments_from_params(pipeline, params)
    if catalog is not None:
        catalog = Path(catalog).resolve()
        if not catalog.is_file():
            raise InputError(str(catalog), "no such catalog file")
        args.update(scene_uri=str(catalog.parent), catalog=catalog.name)
    if services is None:
        args.update(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", features_root=str(out / "features"),
                    dvc_remote=str(out / "dvc-remote"), online="sqlite")
    else:
        args.update(pipeline_arguments(services))
    args.update({k: v for k, v in overrides.items() if v is not None})
    args.setdefault("failure_log", str(out / "failures.jsonl"))
    return args


def run_demo(out: str | Path, pipeline, params: dict | None = None, catalog: str | Path | None = None,
             services: dict | None = None, verbose: bool = False, **overrides) -> dict:
    """Runs the end-to-end `pipeline` under `out` and writes `out/summary.json`; the terminal gets
    one line per task, `out/logs/<task>.log` each task's output (`verbose`: the terminal too)."""
    out = Path(out).resolve()
    args = demo_arguments(pipeline, out, params or {}, Path(catalog) if catalog else None, services, overrides)
    out.mkdir(parents=True, exist_ok=True)
    with environ(services["env"] if services else {}):
        run = run_local(pipeline, out / "kfp", log_dir=out / "logs", verbose=verbose, **args)
        with environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):  # the report's figures: no progress bars
            summary = collect_summary(run, out, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _one_file(run: LocalRun, output: str) -> Path:
    found = [p for p in run.files(output) if p.is_file()]
    if len(found) != 1:
        raise InputError(str(run.run_dir), f"expected one `{output}` output in the run, found {len(found)}")
    return found[0]


def _one(run: LocalRun, output: str) -> dict:
    return json.loads(_one_file(run, output).read_text())


def _report_run_id(report: Path) -> str:
    """The results-report task's returned MLflow run id (beside its output, in executor_output.json)."""
    executor = json.loads((report.parent / "executor_output.json").read_text())
    return executor["parameterValues"]["Output"]


def collect_summary(run: LocalRun, out: Path, args: dict) -> dict:
    """The run's facts, read back from its outputs, MLflow and Feast (what another reader sees)."""
    from sarflow.features.search import load_index
    from sarflow.features.feast_store import FeatureConfig, online_features
    from sarflow.data.quicklook import chip_quicklook
    from sarflow.data.chipstore import open_store
    from sarflow.data.chip_labels import label_columns

    stores = [p for p in run.files("store") if p.is_dir()]
    store = open_store(stores[0])
    version = run.versions[0]
    encoder = _one(run, "encoder")
    embeddings = _one(run, "embeddings")
    features = _one(run, "features")
    probes = _one(run, "probes_report")
    llp = _one(run, "llp_report")
    decisions = [d for record in run.records("decision") for d in record["models"]]
    cards = [c for record in run.records("card") for c in record["models"]]

    mlflow.set_tracking_uri(args["tracking_uri"])
    client = mlflow.MlflowClient()
    models = {}
    for rm in client.search_registered_models():
        models[rm.name] = {"latest": max((int(v.version) for v in client.search_model_versions(f"name='{rm.name}'")),
                                         default=None),
                           "aliases": {alias: str(v) for alias, v in (rm.aliases or {}).items()}}

    fcfg = FeatureConfig(root=args["features_root"], online=args.get("online", "sqlite"),
                         redis=args.get("redis", "127.0.0.1:6379"))
    view = next(v for v in features["objects"] if v.startswith("chip_embeddings_"))
    first = store.chips.sort_values("index")["chip_id"].iloc[0]
    label_column = next(iter(label_columns(store.group, str(store.path))), None)
    online = online_features(fcfg, [first], [f"{view}:embedding"]
                             + ([f"chip_labels:{label_column}"] if label_column else []))
    neighbours = load_index(args["features_root"], embeddings["model"], str(embeddings["version"])).similar(first, k=5)

    report_html = _one_file(run, "report_html")
    results_report = {"run_id": _report_run_id(report_html), "html": str(shutil.copyfile(report_html, out / "results_report.html"))}

    plots = {"chips_quicklook": str(chip_quicklook(store, out / "chips_quicklook.png"))}
    figures = out / "figures"
    for run_id, what in ((encoder["run_id"], "pretrain"), (probes["run_id"], "probes"), (llp["run_id"], "llp")):
        if not run_id:  # a skipped stage (LLP without bags)
            continue
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(figures / what)))
        for f in sorted(local.rglob("*")):
            if f.suffix in FIGURE_SUFFIXES:
                plots[f"{what}/{f.stem}"] = str(f)
    champion_models = {d["model"]: d for d in decisions}
    return {
        "pipeline": run.summary(),
        "catalog": args.get("scene_uri") or "synthetic",
        "store": str(store.path),
        "chips_table": str(Path(store.path) / "chips.parquet"),
        "store_summary": store.summary(),
        "dataset_version": {k: version.get(k) for k in ("dvc_md5", "git_commit", "catalog_hash")},
        "dvc": {"repo": version.get("repo"), "remote": args.get("dvc_remote"), "pushed": version.get("pushed")},
        "mlflow": {"tracking_uri": args["tracking_uri"], "pretrain_run": encoder["run_id"],
                   "encoder": encoder["model_uri"], "probes_run": probes["run_id"], "llp_run": llp["run_id"],
                   "registered_models": models},
        "skipped": {**{f"probe {t}": why for t, why in (probes.get("not_evaluable") or {}).items()},
                    **{f"llp {t}": why for t, why in (llp.get("not_evaluable") or {}).items()},
                    **({"llp": llp["skipped"]} if llp.get("skipped") else {}),
                    **({"probes": probes["skipped"]} if probes.get("skipped") else {})},
        "champions": {name: {"promoted": d["promoted"], "champion": d["champion"], "metric": d["metric"],
                             "value": d["challenger_metric"], "reasons": d["reasons"]}
                      for name, d in champion_models.items()},
        "published": [c["model_uri"] for c in cards],
        "features": {"root": args["features_root"], "feast_repo": features["feast_repo"],
                     "views": [o for o in features["objects"] if o.startswith("chip_")],
                     "services": [o for o in features["objects"] if not o.startswith("chip")],
                     "materialized": features["materialized"], "embedding_dim": embeddings["dim"],
                     "online_example": {"chip_id": first, "embedding_head": [float(v) for v in online.embedding[0][:4]],
                                        **({label_column: float(online[label_column][0])} if label_column else {})},
                     "similar_to_first_chip": neighbours},
        "metrics": {**_pretrain_health(client, encoder["run_id"]),
                    "probes": probes.get("metrics"), "probes_primary": probes.get("primary"),
                    "label_savings": probes.get("label_savings"), "llp": llp.get("metrics")},
        "results_report": results_report,
        "plots": plots,
        "seconds": round(run.seconds, 1),
    }


def _pretrain_health(client, run_id: str) -> dict:
    """Did the encoder learn: its final loss next to the trivial predictor's, and the collapse check."""
    run = client.get_run(run_id).data
    return {"pretrain_final_loss": run.metrics.get("train/final_loss"),
            "pretrain_trivial_loss": run.metrics.get("train/trivial_loss"),
            "pretrain_collapse": run.tags.get("sarflow.collapse")}


def _probe_lines(primary: dict | None, savings: dict | None) -> list[str]:
    """One line per task: the registered probe's test score with its interval, each baseline beside
    it with the label saving against it."""
    from sarflow.downstream.label_efficiency import format_figure, format_saving

    lines = []
    for task, f in sorted((primary or {}).items()):
        lines.append(f"  probe {task:22s} {f.get('metric', '')} {format_figure(f['value'], f.get('ci'))} "
                     f"(embeddings, {f.get('probe')}; 95% interval over test blocks)")
        for b, v in sorted(f.get("baselines", {}).items()):
            saving = (savings or {}).get(task, {}).get(b)
            lines.append(f"    vs {b:18s} {format_figure(v['value'], v.get('ci')):26s} label saving: "
                         f"{format_saving(saving) if saving else '-'}")
    return lines


def _short(chip_id: str) -> str:
    return "_".join(chip_id.rsplit("_", 2)[-2:])


def format_report(summary: dict) -> str:
    s = summary["store_summary"]
    m, f = summary["mlflow"], summary["features"]
    lines = [
        "sarflow demo (end-to-end Kubeflow pipeline, kfp.local)",
        f"  run              {summary['pipeline']['run_dir']}  ({summary['pipeline']['state']}, {summary['seconds']} s)",
        f"  catalog          {summary['catalog']}",
        f"  chip store       {summary['store']}  ({s['chips']} chips of {s['chip_size']} px, {s['crs']}, "
        f"{s['resolution']} m; splits {s['splits']})",
        f"  modalities       {', '.join(s['modalities'])}",
        f"  dataset version  dvc {summary['dataset_version']['dvc_md5']}  catalog {summary['dataset_version']['catalog_hash'][:12]}",
        f"  DVC remote       {summary['dvc']['remote']}",
        f"  MLflow           {m['tracking_uri']}",
        f"    encoder        {m['encoder']}  (pretrain run {m['pretrain_run']})",
        f"    learned?       {_health_line(summary['metrics'])}",
    ]
    for name, info in sorted(m["registered_models"].items()):  # one line a model: its versions and the gate's word
        aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(info["aliases"].items())) or "no aliases"
        d = summary["champions"].get(name)
        gate = "" if d is None else f"; gate {'promoted' if d['promoted'] else 'kept champion'}: {'; '.join(d['reasons'])[:90]}"
        lines.append(f"    {name} v{info['latest']} {aliases}{gate}")
    lines += [
        f"  Feast            {f['feast_repo']}  views {', '.join(f['views'])}",
        f"  similar chips    {_short(f['online_example']['chip_id'])} -> "
        + ", ".join(f"{_short(h['chip_id'])} ({h['similarity']:.3f})" for h in f["similar_to_first_chip"][1:4]),
    ]
    for what, why in summary.get("skipped", {}).items():
        lines.append(f"  skipped          {what}: {why}")
    lines += _probe_lines(summary["metrics"].get("probes_primary"), summary["metrics"].get("label_savings"))
    lines.append(f"  results report   {summary['results_report']['html']}  (MLflow run {summary['results_report']['run_id']})")
    folders = sorted({str(Path(v).parent) for v in summary["plots"].values()})
    lines.append(f"  plots            {len(summary['plots'])} PNGs under {os.path.commonpath(folders) if folders else '-'} "
                 "(each listed in summary.json)")
    return "\n".join(lines)


def _health_line(metrics: dict) -> str:
    final, trivial = metrics.get("pretrain_final_loss"), metrics.get("pretrain_trivial_loss")
    text = "final loss " + ("n/a" if final is None else f"{final:.3f}")
    if final is not None and trivial:
        text += f" vs {trivial:.3f} for the trivial predictor ({final / trivial:.0%} of it)"
    collapse = metrics.get("pretrain_collapse")
    return text + ("" if collapse is None else "; embedding " + ("not collapsed" if collapse == "no" else f"COLLAPSED: {collapse}"))


def clean_output(out: str | Path) -> None:
    """Removes a previous demo's products from `out` (a fresh registry, store and feature store)."""
    out = Path(out)
    for name in ("kfp", "features", "figures", "dvc-remote", "mlflow.db", "mlartifacts", "summary.json",
                 "chips_quicklook.png", "results_report.html", "results", "failures.jsonl", "logs"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

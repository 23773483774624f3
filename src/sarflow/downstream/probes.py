"""Probes on frozen embeddings: label-efficiency curves against baselines and registration of the
best probe per task.

`run_probes(ProbeConfig)` reads embeddings and labels through Feast (a point-in-time join on
the store's chips), trains linear / kNN / small-MLP probes on n = 25, 50, ... labelled train
chips (several seeded draws per n), scores them on the store's test split, and does the same
with two baselines on the same chips: the same probes on raw-pixel statistics, and a small
CNN trained from scratch on the chips. It writes a curve per task (PNG), the curves as a
table (CSV + JSON), logs everything to one MLflow run with the dataset lineage, and registers
the best probe at n = all (chosen on the val split) as `sarflow-<task>` through
`log_downstream_model`, in a nested run per task whose metrics the promotion gate reads.

The tasks and their targets are in `tasks`, the estimators in `estimators`, what the curves
say in `label_efficiency`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic.dataclasses import dataclass as config_dataclass

from sarflow.downstream.estimators import DETERMINISTIC, PROBES, fit_probe, score
from sarflow.downstream.label_efficiency import best_by_val, embedding_curve, label_savings, plot_curves, summarize
from sarflow.downstream.tasks import KIND, LABEL_COLUMNS, PRIMARY_METRIC, TASKS, registered_task_name, task_target
from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG, default_tracking_uri

BASELINES = ("pixel_stats", "scratch")


@config_dataclass(config=STAGE_CONFIG)
class ProbeConfig:
    """params.yaml's `downstream:` section (store and features root come from the command)."""

    store: str
    features_root: str
    tracking_uri: str = field(default_factory=default_tracking_uri)
    model: str | None = None  # embeddings partition (model name); default the newest
    version: str | None = None  # its version; default the newest of that model
    tasks: tuple[str, ...] = TASKS
    sizes: tuple[int, ...] = (25, 50, 100, 200, 500, 1000, 0)  # 0 = every train chip
    draws: int = 5
    probes: tuple[str, ...] = PROBES
    baselines: tuple[str, ...] = BASELINES
    scratch_tasks: tuple[str, ...] = ("landcover", "landcover_presence")  # the CNN costs most: classification only
    scratch_epochs: int = 8
    scratch_draws: int = 2  # draws of the CNN per n (at most `draws`)
    threads: int | None = 1  # BLAS/torch threads for the many tiny fits (1 is fastest for them)
    experiment: str = "sarflow-downstream"
    register: bool = True
    seed: int = 0
    out_dir: str | None = None  # plots and tables; default a temporary folder

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise InputError(",".join(unknown), f"unknown task(s): choose from {list(TASKS)}")
        bad = [p for p in self.probes if p not in PROBES]
        if bad:
            raise InputError(",".join(bad), f"unknown probe(s): choose from {list(PROBES)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise InputError(",".join(bad), f"unknown baseline(s): choose from {list(BASELINES)}")
        if self.draws < 1:
            raise InputError(str(self.draws), "draws must be at least 1")
        if any(int(s) < 0 for s in self.sizes):
            raise InputError(str(self.sizes), "sizes must be positive (0 = every train chip)")


# ------------------------------------------------------------------------------------ data

@dataclass
class ProbeData:
    chip_ids: np.ndarray
    split: np.ndarray
    store_index: np.ndarray  # row of each chip in the store's arrays
    x: np.ndarray  # embeddings (chips, dim)
    labels: pd.DataFrame  # LABEL_COLUMNS present, aligned with chip_ids
    centroid: np.ndarray  # (chips, 2) chip centre in the store's CRS
    model: str
    version: str
    view: str


def _select_partition(root: str, model: str | None, version: str | None) -> tuple[str, str]:
    """(model, version) of the embeddings to probe (`model` may be the method's short name)."""
    from sarflow.features.embed import embedding_partitions, select_partition

    if model is not None and not model.startswith("sarflow-encoder-") and \
            any(p[0] == f"sarflow-encoder-{model}" for p in embedding_partitions(root)):
        model = f"sarflow-encoder-{model}"
    found = select_partition(root, model, version)
    return found[0], found[1]


def load_probe_data(store: str, features_root: str, model: str | None = None, version: str | None = None) -> ProbeData:
    """Embeddings and labels of every chip of the store, through a Feast historical join."""
    import pyarrow.parquet as pq

    from sarflow.features.definitions import view_name
    from sarflow.features.feast_store import FeatureConfig, apply, open_feature_store, training_set
    from sarflow.data.chipstore import read_chip_table

    from sarflow.data.paths import fs_path, join, parquet_files

    labels_dir = join(features_root, "labels")
    model, version = _select_partition(features_root, model, version)
    label_files = parquet_files(labels_dir)
    if not label_files:
        raise InputError(str(labels_dir), "no chip labels under this features root: run "
                                          "`sarflow features labels STORE --root ROOT` first")
    try:
        chips = read_chip_table(store).sort_values("index").reset_index(drop=True)
    except (FileNotFoundError, OSError) as e:
        raise InputError(store, f"not a sarflow chip store (no chips table: {e})") from None
    view = view_name(model, version)
    cfg = FeatureConfig(root=str(features_root))
    have = {v.name for v in open_feature_store(cfg).list_feature_views()}
    if view not in have or "chip_labels" not in have:
        apply(cfg)
    filesystem, first = fs_path(sorted(label_files)[0])
    schema = pq.read_schema(first, filesystem=filesystem)
    columns = [c for c in LABEL_COLUMNS if c in schema.names]
    ts = pd.Timestamp(datetime.now(timezone.utc))
    entity = pd.DataFrame({"chip_id": chips["chip_id"].astype(str), "event_timestamp": ts})
    df = training_set(cfg, entity, [f"{view}:embedding"] + [f"chip_labels:{c}" for c in columns])
    df = df.drop_duplicates("chip_id").set_index("chip_id").reindex(chips["chip_id"])
    has_emb = df["embedding"].map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v))).to_numpy()
    if not has_emb.any():
        raise InputError(features_root, f"the embeddings {model} v{version} cover none of the chips of {store}")
    chips, df = chips[has_emb].reset_index(drop=True), df[has_emb]
    x = np.stack([np.asarray(v, np.float32) for v in df["embedding"]])
    labels = df[columns].astype(np.float64).reset_index(drop=True)
    centroid = np.stack([(chips.minx + chips.maxx).to_numpy() / 2, (chips.miny + chips.maxy).to_numpy() / 2], axis=1)
    return ProbeData(chip_ids=chips["chip_id"].to_numpy(), split=chips["split"].to_numpy(),
                     store_index=chips["index"].to_numpy(), x=x, labels=labels, centroid=centroid,
                     model=model, version=version, view=view)


# ---------------------------------------------------------------------------------- curves

def _draw(train: np.ndarray, n: int, seed: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, draw, n])
    return np.sort(rng.choice(train, size=n, replace=False)) if n < len(train) else train


def _curves(cfg: ProbeConfig, data: ProbeData, pixel: np.ndarray | None, chips: np.ndarray | None) -> pd.DataFrame:
    from sarflow.downstream.baselines import ScratchCNN

    rows = []
    for task in cfg.tasks:
        y, valid = task_target(task, data.labels, cfg.features_root)
        idx = {s: np.flatnonzero(valid & (data.split == s)) for s in ("train", "val", "test")}
        n_all = len(idx["train"])
        if n_all < 2 or len(idx["test"]) == 0:
            raise InputError(cfg.store, f"task {task}: {n_all} labelled train and {len(idx['test'])} test chips: too few to probe")
        sizes = sorted({int(s) for s in cfg.sizes if 0 < int(s) < n_all}) + [n_all]
        sources = [("embeddings", data.x, False)]
        if "pixel_stats" in cfg.baselines:
            sources.append(("pixel_stats", pixel, True))
        same: dict = {}
        for n in sizes:
            for draw in range(cfg.draws):
                tr = _draw(idx["train"], n, cfg.seed, draw)
                for source, feats, impute in sources:
                    for probe in cfg.probes:
                        key = (source, probe)
                        if n == n_all and probe in DETERMINISTIC and key in same:  # every draw is the same fit
                            scores = same[key]
                        else:
                            model = fit_probe(probe, task, feats[tr], y[tr], seed=cfg.seed + draw, impute=impute)
                            scores = {ev: score(task, model, feats[idx[ev]], y[idx[ev]]) for ev in ("test", "val")}
                            if n == n_all:
                                same[key] = scores
                        for ev, values in scores.items():
                            for metric, value in values.items():
                                rows.append((task, source, probe, n, n == n_all, draw, ev, metric, value))
                if ("scratch" in cfg.baselines and task in cfg.scratch_tasks and draw < cfg.scratch_draws
                        and len(np.unique(y[tr], axis=0)) > 1):
                    cnn = ScratchCNN(KIND[task], epochs=cfg.scratch_epochs, seed=cfg.seed + draw).fit(chips[tr], y[tr])
                    for ev in ("test", "val"):
                        for metric, value in score(task, cnn, chips[idx[ev]], y[idx[ev]]).items():
                            rows.append((task, "scratch", "cnn", n, n == n_all, draw, ev, metric, value))
    return pd.DataFrame(rows, columns=["task", "source", "probe", "n", "is_all", "draw", "split", "metric", "value"])


# -------------------------------------------------------------------------------- run_probes

def run_probes(cfg: ProbeConfig) -> dict:
    """Curves, baselines, plots and tables logged in one MLflow run; best probe per task registered."""
    cfg.check()
    if cfg.threads is None:
        return _run_probes(cfg)
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with threadpool_limits(cfg.threads):
            return _run_probes(cfg)
    finally:
        torch.set_num_threads(before)


def _run_probes(cfg: ProbeConfig) -> dict:
    import mlflow

    from sarflow.downstream.baselines import chip_tensor, pixel_statistics
    from sarflow.downstream.models import log_downstream_model
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    data = load_probe_data(cfg.store, cfg.features_root, cfg.model, cfg.version)
    pixel = chips = None
    if "pixel_stats" in cfg.baselines:
        pixel = pixel_statistics(cfg.store)[0][data.store_index]
    if "scratch" in cfg.baselines and any(t in cfg.scratch_tasks for t in cfg.tasks):
        chips = chip_tensor(cfg.store)[data.store_index]
    curves = _curves(cfg, data, pixel, chips)
    summary = summarize(curves)
    savings = label_savings(summary, cfg.tasks)

    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(tempfile.mkdtemp(prefix="sarflow-probes-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    curves_path, summary_path = out_dir / "curves.csv", out_dir / "curves_summary.csv"
    curves.to_csv(curves_path, index=False)
    summary.to_csv(summary_path, index=False)
    plots = plot_curves(summary, cfg.tasks, out_dir, f"({data.model} v{data.version})")

    metrics: dict[str, float] = {}
    at_all = summary[summary.is_all & (summary["split"] == "test")]
    for r in at_all.itertuples():
        metrics[f"{r.task}_{r.source}_{r.probe}_test_{r.metric}"] = float(r.mean)
    selected = {t: best_by_val(summary, t, "embeddings") or cfg.probes[0] for t in cfg.tasks}
    for task, probe in selected.items():
        for r in at_all[(at_all.task == task) & (at_all.source == "embeddings") & (at_all.probe == probe)].itertuples():
            metrics[f"{task}_test_{r.metric}"] = float(r.mean)

    lineage = dataset_lineage(cfg.store)
    eval_set = f"{lineage['sarflow.dataset_dvc_md5']}:{data.model}:{data.version}:test"
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment)
    tags = {**lineage, "sarflow.embeddings_model": data.model, "sarflow.embeddings_version": data.version,
            "sarflow.embeddings_view": data.view, "sarflow.eval_set": eval_set}
    models: dict[str, str | None] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name="probes", tags=tags) as run:
        params = {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for p in [curves_path, summary_path, *plots]:
            mlflow.log_artifact(str(p), artifact_path="downstream")
        mlflow.log_dict({"label_savings": savings, "selected_probe": selected,
                         "curves": {t: embedding_curve(summary, t) for t in cfg.tasks}}, "downstream/label_savings.json")
        mlflow.log_table(summary, artifact_file="downstream/curves_summary.json")
        for task in cfg.tasks:
            y, valid = task_target(task, data.labels, cfg.features_root)
            tr = np.flatnonzero(valid & (data.split == "train"))
            te = np.flatnonzero(valid & (data.split == "test"))
            probe = selected[task]
            model = fit_probe(probe, task, data.x[tr], y[tr], seed=cfg.seed)
            test = {f"test_{k}": v for k, v in score(task, model, data.x[te], y[te]).items()}
            primary = PRIMARY_METRIC[task][0]
            ordered = {primary: test[primary], **{k: v for k, v in test.items() if k != primary and np.isfinite(v)}}
            name = registered_task_name(task)
            with mlflow.start_run(run_name=f"probe-{task}", nested=True,
                                  tags={**tags, "sarflow.task": task, "sarflow.probe": probe}):
                mlflow.log_params({"task": task, "probe": probe, "n_train": len(tr), "embeddings_model": data.model,
                                   "embeddings_version": data.version})
                info = log_downstream_model(model, name, data.x[te[:5]], lineage=lineage, eval_set=eval_set,
                                            metrics=ordered, register=cfg.register)
            models[name] = info["version"]
            if cfg.register:
                client = mlflow.MlflowClient()
                client.set_model_version_tag(name, info["version"], "sarflow.probe", probe)
                client.set_model_version_tag(name, info["version"], "sarflow.embeddings_model", data.model)
                client.set_model_version_tag(name, info["version"], "sarflow.embeddings_version", data.version)
    result = {"run_id": run.info.run_id, "models": models, "metrics": metrics, "curves": str(curves_path),
              "summary": str(summary_path), "plots": [str(p) for p in plots], "label_savings": savings,
              "selected_probe": selected, "embeddings": {"model": data.model, "version": data.version, "view": data.view},
              "out_dir": str(out_dir)}
    (out_dir / "probes.json").write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(out_dir / "probes.json")
    return result

"""Probes on frozen embeddings: label-efficiency curves against baselines and registration of the
best probe per task.

`run_probes(ProbeConfig)` probes every task the store's labels declare (`tasks.store_tasks`, or
the ones named). It reads embeddings and the tasks' label columns through Feast (a
point-in-time join on the store's chips), trains linear / kNN / small-MLP probes on n = 25, 50,
... labelled train chips (several seeded draws per n; one at n = all, where every draw would
see the same chips), scores them on the store's val and test splits (the same test chips at
every n and draw), and does the same with three baselines on the same chips: the same probes on
raw-pixel statistics of the store's inputs and on the embeddings of a randomly initialised
encoder of the probed encoder's architecture (`baselines.random_encoder_features`), and a small
CNN trained from scratch on the chips with the same step budget at every n, stopped at its own
validation optimum. Every test point gets a 95 % interval by a bootstrap over the test split's
spatial blocks (`label_efficiency.block_interval`); the label savings against each baseline say
"measured", "at least", "none" or "not measurable" from those intervals. It writes a curve per
task (PNG), the curves as a table (CSV + JSON), logs everything to one MLflow run with the
dataset lineage, and registers the best probe at n = all (chosen on the val split) as
`Task.registered_name` through `log_downstream_model`, in a nested run per task whose metrics
the promotion gate reads.

One number per task (`result["primary"]`, `primary_figures`): the registered probe's test score
of the task's primary metric with every train label and its interval; the console, the run's
metric `<task>_test_<metric>` (+ `_ci_low`/`_ci_high`), the nested run's `test_<metric>`, the
results report's `all` column and probes.json all carry that one figure.

Honest numbers: a task whose train split cannot teach it, or whose test split cannot measure it
(`tasks.not_evaluable`: too few chips, one class, zero variance), is reported as not evaluable
(a console line, the parent run's tag `sarflow.not_evaluable.<task>`, `result["not_evaluable"]`):
it gets no curve and is never registered. A curve point whose train draw has one class is
skipped, not scored. The probe is chosen on val only; where val cannot measure the task the
default probe (the first of `probes`) is taken and the run says so. No evaluable task at all is
an InputError. A registered model's evaluation set is `<dataset md5>:test:<task>`
(`models.evaluation_set`), whatever encoder made the embeddings, so the gate compares encoders.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic.dataclasses import dataclass as config_dataclass

from sarflow.downstream.estimators import PROBES, fit_probe, fittable, model_output, output_metrics, score
from sarflow.downstream.label_efficiency import (BOOTSTRAP, block_interval, embedding_curve, label_savings,
                                                 plot_curves, primary_figures, summarize, tasks_json, spatial_blocks)
from sarflow.downstream.tasks import Task, not_evaluable, select_tasks, store_tasks, task_target
from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG, default_tracking_uri

log = logging.getLogger(__name__)

BASELINES = ("pixel_stats", "random_init", "scratch")
FEATURE_BASELINES = ("pixel_stats", "random_init")  # probed like the embeddings
SPLITS = ("train", "val", "test")
MIN_TRAIN_CHIPS = 2  # a train split below this cannot fit a probe (classes and variance: tasks.not_evaluable)


@config_dataclass(config=STAGE_CONFIG)
class ProbeConfig:
    """params.yaml's `downstream:` section (store and features root come from the command)."""

    store: str
    features_root: str
    tracking_uri: str = field(default_factory=default_tracking_uri)
    model: str | None = None  # embeddings partition (model name); default the newest
    version: str | None = None  # its version; default the newest of that model
    tasks: tuple[str, ...] = ()  # task names; empty = every task the store's labels declare
    sizes: tuple[int, ...] = (25, 50, 100, 200, 500, 1000, 0)  # 0 = every train chip
    draws: int = 5
    probes: tuple[str, ...] = PROBES  # the first one is the default when val cannot choose
    baselines: tuple[str, ...] = BASELINES
    modalities: tuple[str, ...] = ()  # the baselines' inputs; empty = every input source of the store
    scratch_tasks: tuple[str, ...] | None = None  # the CNN costs most; None = the classification tasks
    scratch_steps: int = 300  # the CNN's optimiser steps at every n (early-stopped on val)
    scratch_epochs: int = 1  # at least this many passes over the train draw
    scratch_draws: int = 2  # draws of the CNN per n (at most `draws`)
    bootstrap: int = BOOTSTRAP  # replicates of the intervals over test blocks
    threads: int | None = 1  # BLAS/torch threads for the many tiny fits (1 is fastest for them)
    experiment: str = "sarflow-downstream"
    register: bool = True
    seed: int = 0
    out_dir: str | None = None  # plots and tables; default a temporary folder

    def check(self) -> None:
        bad = [p for p in self.probes if p not in PROBES]
        if bad or not self.probes:
            raise InputError(",".join(bad) or "probes", f"unknown probe(s): choose from {list(PROBES)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise InputError(",".join(bad), f"unknown baseline(s): choose from {list(BASELINES)}")
        if self.draws < 1:
            raise InputError(str(self.draws), "draws must be at least 1")
        if any(int(s) < 0 for s in self.sizes):
            raise InputError(str(self.sizes), "sizes must be positive (0 = every train chip)")


def probe_tasks(cfg: ProbeConfig) -> tuple[list[Task], set[str]]:
    """(the tasks to probe, the names of those the scratch CNN also runs on), from the store."""
    try:
        declared = store_tasks(cfg.store)
    except InputError:
        raise
    except (FileNotFoundError, OSError, KeyError, ValueError) as e:
        raise InputError(cfg.store, f"not a sarflow chip store ({type(e).__name__}: {e})") from None
    if not declared:
        raise InputError(cfg.store, "the store declares no label source: nothing to probe (give a label source "
                                    "`classes`, a `legend` or a `range` in its catalog and rerun `sarflow tile`)")
    tasks = select_tasks(declared, cfg.tasks, cfg.store)
    if cfg.scratch_tasks is None:
        scratch = {t.name for t in tasks if t.kind in ("multiclass", "multilabel")}
    else:
        scratch = {t.name for t in select_tasks(declared, cfg.scratch_tasks, cfg.store)} if cfg.scratch_tasks else set()
    return tasks, scratch


# ------------------------------------------------------------------------------------ data

@dataclass
class ProbeData:
    chip_ids: np.ndarray
    split: np.ndarray
    store_index: np.ndarray  # row of each chip in the store's arrays
    x: np.ndarray  # embeddings (chips, dim)
    labels: pd.DataFrame  # the tasks' label columns (Task.columns), aligned with chip_ids
    centroid: np.ndarray  # (chips, 2) chip centre in the store's CRS
    cells: np.ndarray  # (chips, 2) grid cell (ix, iy) of each chip
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


def chip_cells(chips: pd.DataFrame) -> np.ndarray:
    """(chips, 2) integer grid cells (ix, iy): the chip table's `ix`/`iy`, else from the bounds."""
    if {"ix", "iy"} <= set(chips.columns):
        return chips[["ix", "iy"]].to_numpy(np.int64)
    w = float(np.median(chips.maxx - chips.minx)) or 1.0
    h = float(np.median(chips.maxy - chips.miny)) or 1.0
    return np.stack([np.rint((chips.minx - chips.minx.min()) / w), np.rint((chips.maxy.max() - chips.maxy) / h)],
                    axis=1).astype(np.int64)


def load_probe_data(store: str, features_root: str, model: str | None = None, version: str | None = None,
                    tasks: list[Task] | None = None) -> ProbeData:
    """Embeddings and the label columns of `tasks` (default every task of the store) of every
    chip of the store, through a Feast historical join."""
    import pyarrow.parquet as pq

    from sarflow.data.chipstore import read_chip_table
    from sarflow.data.paths import fs_path, join, parquet_files
    from sarflow.features.definitions import view_name
    from sarflow.features.feast_store import FeatureConfig, apply, open_feature_store, training_set

    labels_dir = join(features_root, "labels")
    model, version = _select_partition(features_root, model, version)
    label_files = parquet_files(labels_dir)
    if not label_files:
        raise InputError(str(labels_dir), "no chip labels under this features root: run "
                                          "`sarflow features labels STORE --features-root ROOT` first")
    try:
        chips = read_chip_table(store).sort_values("index").reset_index(drop=True)
    except (FileNotFoundError, OSError) as e:
        raise InputError(store, f"not a sarflow chip store (no chips table: {e})") from None
    if tasks is None:
        tasks = store_tasks(store)
    columns = list(dict.fromkeys(c for t in tasks for c in t.columns))
    filesystem, first = fs_path(sorted(label_files)[0])
    schema = pq.read_schema(first, filesystem=filesystem)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(str(labels_dir), f"the chip labels have no columns {missing} for the tasks "
                                          f"{[t.name for t in tasks]}: rerun `sarflow features labels {store} --features-root ROOT`")
    view = view_name(model, version)
    cfg = FeatureConfig(root=str(features_root))
    views = {v.name: v for v in open_feature_store(cfg).list_feature_views()}
    registered = {f.name for f in views["chip_labels"].features} if "chip_labels" in views else set()
    if view not in views or not set(columns) <= registered:
        apply(cfg)
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
                     cells=chip_cells(chips), model=model, version=version, view=view)


# ---------------------------------------------------------------------------- evaluability

@dataclass
class TaskSplits:
    """A task's targets on the probe data, its labelled chips per split, and whether the splits
    can measure it: `reason` (train or test cannot: not evaluable) and `val_reason` (val cannot:
    the probe is the default one)."""
    task: Task
    y: np.ndarray
    idx: dict[str, np.ndarray]
    reason: str | None
    val_reason: str | None


def task_splits(task: Task, data: ProbeData, where: str) -> TaskSplits:
    y, valid = task_target(task, data.labels, where)
    idx = {s: np.flatnonzero(valid & (data.split == s)) for s in SPLITS}
    reason = (not_evaluable(task, y[idx["train"]], "train", min_chips=MIN_TRAIN_CHIPS)
              or not_evaluable(task, y[idx["test"]], "test"))
    return TaskSplits(task, y, idx, reason, not_evaluable(task, y[idx["val"]], "val"))


# ---------------------------------------------------------------------------------- curves

def _draw(train: np.ndarray, n: int, seed: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, draw, n])
    return np.sort(rng.choice(train, size=n, replace=False)) if n < len(train) else train


CURVE_COLUMNS = ["task", "source", "probe", "n", "is_all", "draw", "split", "metric", "value"]


def _usable_baselines(cfg: ProbeConfig) -> tuple[tuple[str, ...], dict[str, str]]:
    """The configured baselines the store can feed (pixel baselines need a continuous input), and
    why the others are left out. Inputs chosen with `modalities` that cannot feed them are an error."""
    from sarflow.data.chipstore import continuous_inputs, open_chip_group

    pixel = tuple(b for b in cfg.baselines if b != "random_init")
    kept = tuple(b for b in cfg.baselines if b == "random_init")
    if not pixel:
        return kept, {}
    try:
        continuous_inputs(open_chip_group(cfg.store), cfg.modalities or None, cfg.store, "the pixel baselines")
    except InputError as e:
        if cfg.modalities:
            raise
        log.warning("%s: baselines %s left out: %s", cfg.store, list(pixel), e.cause)
        return kept, {b: e.cause for b in pixel}
    return tuple(b for b in cfg.baselines if b in pixel + kept), {}


@dataclass
class Curves:
    """The curve points (long table `points`), the points skipped because their train draw could
    not teach the task, and each test point's model outputs per draw (task, source, probe, n) ->
    [output of draw 0, ...] on the task's test chips (for the intervals)."""
    points: pd.DataFrame
    skipped: list[dict]
    outputs: dict


def _curves(cfg: ProbeConfig, data: ProbeData, splits: list[TaskSplits], scratch_tasks: set[str],
            features: dict[str, np.ndarray] | None, chips: np.ndarray | None,
            baselines: tuple[str, ...] | None = None) -> Curves:
    """The curve points of the evaluable tasks: every probe on the embeddings and on each feature
    baseline in `features` (source -> (chips, dim), store rows aligned with `data`), the scratch
    CNN on `chips`. Every draw at every n is scored on the same test chips; at n = all there is
    one draw (the train chips are the same), fitted with seed `cfg.seed` like the registered probe."""
    from sarflow.downstream.baselines import ScratchCNN

    baselines = cfg.baselines if baselines is None else baselines
    features = features or {}
    rows, skipped, outputs = [], [], {}
    for ts in splits:
        task, y, idx = ts.task, ts.y, ts.idx
        evals = ("test",) if ts.val_reason else ("test", "val")
        n_all = len(idx["train"])
        sizes = sorted({int(s) for s in cfg.sizes if 0 < int(s) < n_all}) + [n_all]
        sources = [("embeddings", data.x, False)]
        sources += [(b, features[b], b == "pixel_stats") for b in FEATURE_BASELINES if b in baselines and b in features]
        n_labels = y.shape[1] if y.ndim > 1 else None

        def add(source, probe, n, draw, model, x):
            for ev in evals:
                out = model_output(task, model, x[idx[ev]], n_labels)
                if ev == "test":
                    outputs.setdefault((task.name, source, probe, n), []).append(out)
                for metric, value in output_metrics(task, y[idx[ev]], out).items():
                    rows.append((task.name, source, probe, n, n == n_all, draw, ev, metric, value))

        for n in sizes:
            for draw in range(cfg.draws if n < n_all else 1):
                tr = _draw(idx["train"], n, cfg.seed, draw)
                if not fittable(task, y[tr]):
                    skipped.append({"task": task.name, "n": int(n), "draw": draw,
                                    "why": "the train draw has one class" if task.kind != "regression"
                                    else "the train draw's target is constant"})
                    continue
                for source, feats, impute in sources:
                    for probe in cfg.probes:
                        add(source, probe, n, draw, fit_probe(probe, task, feats[tr], y[tr], seed=cfg.seed + draw,
                                                              impute=impute), feats)
                if "scratch" in baselines and task.name in scratch_tasks and draw < cfg.scratch_draws:
                    val = idx["val"] if not ts.val_reason else idx["val"][:0]
                    cnn = ScratchCNN(task.kind, steps=cfg.scratch_steps, min_epochs=cfg.scratch_epochs,
                                     seed=cfg.seed + draw, metric=task.metric, higher_is_better=task.higher_is_better)
                    add("scratch", "cnn", n, draw, cnn.fit(chips[tr], y[tr], chips[val], y[val]), chips)
    return Curves(pd.DataFrame(rows, columns=CURVE_COLUMNS), skipped, outputs)


def curve_intervals(curves: Curves, data: ProbeData, splits: list[TaskSplits], block_side: int | None,
                    replicates: int = BOOTSTRAP, seed: int = 0, default: str = PROBES[0]) -> tuple[pd.DataFrame, dict]:
    """The 95 % intervals over spatial test blocks of the test points the curves show (each
    source's probe chosen on val: `label_efficiency.source_curve`), as rows of task, source,
    probe, n, split, metric, ci_low, ci_high; and per task the blocks they resample ({blocks,
    block_chips, test_chips})."""
    from sarflow.downstream.label_efficiency import BASELINE_SOURCES, source_curve

    plain = summarize(curves.points)
    shown = {(ts.task.name, source, c["probe"], c["n"]) for ts in splits for source in ("embeddings",) + BASELINE_SOURCES
             for c in source_curve(plain, ts.task, source, default)}
    rows, units = [], {}
    for ts in splits:
        te = ts.idx["test"]
        blocks, side = spatial_blocks(data.cells[te], block_side)
        units[ts.task.name] = {"blocks": int(blocks.max(initial=-1)) + 1, "block_chips": int(side), "test_chips": len(te)}
        for (task, source, probe, n), outs in curves.outputs.items():
            if task != ts.task.name or (task, source, probe, n) not in shown:
                continue
            for metric, (lo, hi) in block_interval(ts.task, ts.y[te], outs, blocks, replicates, seed).items():
                rows.append((task, source, probe, n, "test", metric, lo, hi))
    return pd.DataFrame(rows, columns=["task", "source", "probe", "n", "split", "metric", "ci_low", "ci_high"]), units


# -------------------------------------------------------------------------------- run_probes

def run_probes(cfg: ProbeConfig) -> dict:
    """Curves, baselines, plots and tables logged in one MLflow run; best probe per evaluable task registered."""
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

    from sarflow.downstream.baselines import chip_tensor, pixel_statistics, random_encoder_features
    from sarflow.downstream.models import dataset_id, evaluation_set, log_downstream_model
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import loggable_params, setup_mlflow

    tasks, scratch_tasks = probe_tasks(cfg)
    data = load_probe_data(cfg.store, cfg.features_root, cfg.model, cfg.version, tasks)
    splits = [task_splits(t, data, cfg.features_root) for t in tasks]
    skipped_tasks = {ts.task.name: ts.reason for ts in splits if ts.reason}
    for name, reason in skipped_tasks.items():
        log.warning("%s: task %s is not evaluable, not probed nor registered: %s", cfg.store, name, reason)
    splits = [ts for ts in splits if not ts.reason]
    if not splits:
        raise InputError(cfg.store, "no task is evaluable on this store: " +
                         "; ".join(f"{k}: {v}" for k, v in skipped_tasks.items()))
    evaluable = [ts.task for ts in splits]
    selection_note = {}
    for ts in splits:
        if ts.val_reason:
            selection_note[ts.task.name] = f"default probe {cfg.probes[0]} (val cannot choose: {ts.val_reason})"
            log.warning("%s: task %s: %s", cfg.store, ts.task.name, selection_note[ts.task.name])

    baselines, skipped_baselines = _usable_baselines(cfg)
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment)  # the random encoder's architecture is read from it
    features, chips = {}, None
    if "pixel_stats" in baselines:
        features["pixel_stats"] = pixel_statistics(cfg.store, cfg.modalities or None)[0][data.store_index]
    if "random_init" in baselines:
        try:
            features["random_init"] = random_encoder_features(cfg.store, data.model, data.version)[data.store_index]
        except InputError as e:
            if "random_init" in (cfg.baselines if cfg.baselines != BASELINES else ()):
                raise
            skipped_baselines["random_init"] = str(e)
            log.warning("%s: baseline random_init left out: %s", cfg.store, skipped_baselines["random_init"])
    if "scratch" in baselines and any(t.name in scratch_tasks for t in evaluable):
        chips = chip_tensor(cfg.store, cfg.modalities or None)[data.store_index]
    curves = _curves(cfg, data, splits, scratch_tasks, features, chips, baselines)
    intervals, ci_units = curve_intervals(curves, data, splits, _split_block(cfg.store), cfg.bootstrap, cfg.seed,
                                       cfg.probes[0])
    summary = summarize(curves.points, intervals)
    skipped_points = curves.skipped
    default = cfg.probes[0]
    savings = label_savings(summary, evaluable, default)
    primary = primary_figures(summary, evaluable, default)

    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(tempfile.mkdtemp(prefix="sarflow-probes-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    curves_path, summary_path = out_dir / "curves.csv", out_dir / "curves_summary.csv"
    curves.points.to_csv(curves_path, index=False)
    summary.to_csv(summary_path, index=False)
    plots = plot_curves(summary, evaluable, out_dir, f"({data.model} v{data.version})")

    metrics: dict[str, float] = {}
    at_all = summary[summary.is_all & (summary["split"] == "test")]
    for r in at_all.itertuples():
        metrics[f"{r.task}_{r.source}_{r.probe}_test_{r.metric}"] = float(r.mean)
    selected = {t.name: primary[t.name]["probe"] for t in evaluable}
    for name, probe in selected.items():
        if name not in selection_note:
            selection_note[name] = f"best on val: {probe}"
        for r in at_all[(at_all.task == name) & (at_all.source == "embeddings") & (at_all.probe == probe)].itertuples():
            metrics[f"{name}_test_{r.metric}"] = float(r.mean)
            metrics[f"{name}_test_{r.metric}_ci_low"] = float(r.ci_low)
            metrics[f"{name}_test_{r.metric}_ci_high"] = float(r.ci_high)

    lineage = dataset_lineage(cfg.store)
    dataset = dataset_id(lineage)
    eval_sets = {t.name: evaluation_set(dataset, "test", t.name) for t in evaluable}
    tags = {**lineage, "sarflow.embeddings_model": data.model, "sarflow.embeddings_version": data.version,
            "sarflow.embeddings_view": data.view}
    parent_tags = {**tags, **{f"sarflow.eval_set.{k}": v for k, v in eval_sets.items()},
                   **{f"sarflow.not_evaluable.{k}": v[:4900] for k, v in skipped_tasks.items()},
                   **{f"sarflow.selection.{k}": v[:4900] for k, v in selection_note.items()},
                   **{f"sarflow.baseline_left_out.{k}": v[:4900] for k, v in skipped_baselines.items()}}
    models: dict[str, dict] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name="probes", tags=parent_tags) as run:
        params = {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
        mlflow.log_params(loggable_params(params))
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for p in [curves_path, summary_path, *plots]:
            mlflow.log_artifact(str(p), artifact_path="downstream")
        mlflow.log_dict({"primary": primary, "label_savings": savings, "intervals": ci_units,
                         "selected_probe": selected, "selection": selection_note,
                         "not_evaluable": skipped_tasks, "skipped_points": skipped_points,
                         "baselines_left_out": skipped_baselines,
                         "curves": {t.name: embedding_curve(summary, t, default) for t in evaluable}},
                        "downstream/label_savings.json")
        mlflow.log_dict({"tasks": tasks_json(evaluable), "not_evaluable": skipped_tasks}, "downstream/tasks.json")
        mlflow.log_table(summary, artifact_file="downstream/curves_summary.json")
        for ts in splits:
            task, probe = ts.task, selected[ts.task.name]
            tr, te = ts.idx["train"], ts.idx["test"]
            model = fit_probe(probe, task, data.x[tr], ts.y[tr], seed=cfg.seed)
            test = {f"test_{k}": v for k, v in score(task, model, data.x[te], ts.y[te]).items()}  # the curve's n = all fit
            key = f"test_{task.metric}"
            figure = primary[task.name]
            if not np.isclose(test.get(key, np.nan), figure["value"], rtol=1e-9, atol=1e-12, equal_nan=True):
                raise RuntimeError(f"{task.name}: the registered probe's {key} {test.get(key)} differs from the "
                                   f"curve's n = all point {figure['value']}")  # one number per task, by construction
            test.update({f"{key}_ci_low": figure["ci"][0], f"{key}_ci_high": figure["ci"][1]})
            if not np.isfinite(test.get(key, np.nan)):
                skipped_tasks[task.name] = f"its {key} on the test split is not finite"
                mlflow.set_tag(f"sarflow.not_evaluable.{task.name}", skipped_tasks[task.name])
                log.warning("%s: task %s is not evaluable: %s", cfg.store, task.name, skipped_tasks[task.name])
                continue
            ordered = {key: test[key], **{k: v for k, v in test.items() if k != key and np.isfinite(v)}}
            name = task.registered_name
            with mlflow.start_run(experiment_id=exp_id, run_name=f"probe-{task.name}", nested=True,
                                  tags={**tags, "sarflow.task": task.name, "sarflow.probe": probe,
                                        "sarflow.eval_set": eval_sets[task.name],
                                        "sarflow.selection": selection_note[task.name][:4900]}):
                mlflow.log_params({"task": task.name, "probe": probe, "n_train": len(tr), "n_test": len(te),
                                   "embeddings_model": data.model, "embeddings_version": data.version})
                info = log_downstream_model(model, name, data.x[te[:5]], lineage=lineage,
                                            eval_set=eval_sets[task.name], metrics=ordered, register=cfg.register)
            if cfg.register:
                models[name] = {"version": str(info["version"]), "metric": key,
                                "higher_is_better": bool(task.higher_is_better)}
                client = mlflow.MlflowClient()
                client.set_model_version_tag(name, info["version"], "sarflow.probe", probe)
                client.set_model_version_tag(name, info["version"], "sarflow.task", task.name)
                client.set_model_version_tag(name, info["version"], "sarflow.embeddings_model", data.model)
                client.set_model_version_tag(name, info["version"], "sarflow.embeddings_version", data.version)
    task_info = {t.name: {"kind": t.kind, "metric": t.metric, "higher_is_better": t.higher_is_better,
                          "eval_set": eval_sets[t.name], "selection": selection_note[t.name],
                          "classes": list(t.class_names), "units": t.units}
                 for t in evaluable if t.name not in skipped_tasks}
    result = {"run_id": run.info.run_id, "models": models, "not_evaluable": skipped_tasks, "tasks": task_info,
              "metrics": metrics, "curves": str(curves_path), "summary": str(summary_path),
              "plots": [str(p) for p in plots], "primary": {k: v for k, v in primary.items() if k not in skipped_tasks},
              "label_savings": savings, "intervals": ci_units, "selected_probe": selected,
              "skipped_points": skipped_points, "baselines_left_out": skipped_baselines,
              "embeddings": {"model": data.model, "version": data.version, "view": data.view}, "out_dir": str(out_dir)}
    write_json_atomic(out_dir / "probes.json", result)
    result["json"] = str(out_dir / "probes.json")
    return result


def _split_block(store: str) -> int | None:
    """The side (chips) of the splitter's blocks, from the store's attributes (None: unknown)."""
    from sarflow.data.chipstore import open_chip_group

    side = (open_chip_group(store).attrs.get("split") or {}).get("block_chips")
    return int(side) if isinstance(side, (int, float)) and side > 0 else None


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON beside `path`, then renames: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)

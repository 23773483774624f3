"""Probes on frozen embeddings: label-efficiency curves against baselines, registration of the
best probe per task, a modality ablation and a region-generalization check.

`run_probes(ProbeConfig)` reads embeddings and labels through Feast (a point-in-time join on
the store's chips), trains linear / kNN / small-MLP probes on n = 25, 50, ... labelled train
chips (several seeded draws per n), scores them on the store's test split, and does the same
with two baselines on the same chips: the same probes on raw-pixel statistics, and a small
CNN trained from scratch on the chips. It writes a curve per task (PNG), the curves as a
table (CSV + JSON), logs everything to one MLflow run with the dataset lineage, and registers
the best probe at n = all (chosen on the val split) as `sarflow-<task>` through
`log_downstream_model`, in a nested run per task whose metrics the promotion gate reads.

Tasks (targets from the `chip_labels` view):
- landcover: the chip's majority WorldCover class; accuracy, macro-F1.
- landcover_presence: multi-label presence of each class (fraction > 0.05); mAP over the
  classes present in the test split.
- tree_cover (tree_cover_mean / 100), builtup (builtup_percent_mean / 100), water
  (water_fraction): RMSE, R².
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.errors import InputError

TASKS = ("landcover", "landcover_presence", "tree_cover", "builtup", "water")
PRIMARY_METRIC = {"landcover": ("test_macro_f1", True), "landcover_presence": ("test_map", True),
                  "tree_cover": ("test_rmse", False), "builtup": ("test_rmse", False), "water": ("test_rmse", False)}
KIND = {"landcover": "multiclass", "landcover_presence": "multilabel", "tree_cover": "regression",
        "builtup": "regression", "water": "regression"}
PROBES = ("linear", "knn", "mlp")
DETERMINISTIC = ("linear", "knn")  # same data, same fit: at n = all their draws are not refit
BASELINES = ("pixel_stats", "scratch")
PRESENCE_THRESHOLD = 0.05
WORLDCOVER = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
LABEL_COLUMNS = tuple(f"frac_{c}" for c in WORLDCOVER) + ("water_fraction", "tree_cover_mean", "builtup_percent_mean")


def registered_task_name(task: str) -> str:
    """`landcover_presence` -> `sarflow-landcover-presence` (the registered model's name)."""
    return "sarflow-" + task.replace("_", "-")


def _primary(task: str) -> tuple[str, bool]:
    name, higher = PRIMARY_METRIC[task]
    return name.removeprefix("test_"), higher


@dataclass
class ProbeConfig:
    store: str
    features_root: str
    tracking_uri: str = "sqlite:///mlflow.db"
    model: str | None = None  # embeddings partition (model name); default the newest
    version: str | None = None  # its version; default the newest of that model
    tasks: tuple[str, ...] = TASKS
    sizes: tuple[int, ...] = (25, 50, 100, 200, 500, 1000, 0)  # 0 = every train chip
    draws: int = 5
    probes: tuple[str, ...] = PROBES
    baselines: tuple[str, ...] = BASELINES
    scratch_tasks: tuple[str, ...] = ("landcover", "landcover_presence")  # the CNN costs most: classification only
    scratch_epochs: int = 6
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


def task_target(task: str, labels: pd.DataFrame, where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(target, valid rows) of a task; rows whose target is NaN are not valid."""
    if task not in TASKS:
        raise InputError(task, f"unknown task: choose from {list(TASKS)}")
    if task in ("landcover", "landcover_presence"):
        cols = [f"frac_{c}" for c in WORLDCOVER]
        missing = [c for c in cols if c not in labels]
        if missing:
            raise InputError(where, f"the labels have no class fractions {missing} for task {task}")
        f = labels[cols].to_numpy(np.float64)
        valid = np.isfinite(f).all(axis=1) & (np.nan_to_num(f).sum(axis=1) > 0)
        if task == "landcover":
            return np.asarray(WORLDCOVER)[np.nan_to_num(f, nan=-1).argmax(axis=1)], valid
        return (np.nan_to_num(f) > PRESENCE_THRESHOLD).astype(np.int64), valid
    col, scale = {"tree_cover": ("tree_cover_mean", 100.0), "builtup": ("builtup_percent_mean", 100.0),
                  "water": ("water_fraction", 1.0)}[task]
    if col not in labels:
        raise InputError(where, f"the labels have no column {col!r} for task {task} (does the store have that layer?)")
    y = labels[col].to_numpy(np.float64) / scale
    return y, np.isfinite(y)


# ---------------------------------------------------------------------------------- probes

def make_probe(name: str, kind: str, n_train: int, seed: int = 0, impute: bool = False):
    """A sklearn Pipeline: [imputer,] scaler, estimator. `kind`: multiclass, multilabel, regression."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = max(1, min(5, n_train))
    mlp = dict(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=100, random_state=seed, solver="lbfgs")
    if kind == "multiclass":
        est = {"linear": lambda: LogisticRegression(max_iter=300, C=1.0),
               "knn": lambda: KNeighborsClassifier(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPClassifier(**mlp)}[name]()
    elif kind == "multilabel":
        # native multi-label estimators (a class constant in a draw is no special case)
        est = {"linear": lambda: RidgeClassifier(alpha=1.0),
               "knn": lambda: KNeighborsClassifier(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPClassifier(**mlp)}[name]()
    else:
        est = {"linear": lambda: Ridge(alpha=1.0),
               "knn": lambda: KNeighborsRegressor(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPRegressor(**mlp)}[name]()
    steps = ([SimpleImputer(add_indicator=True, keep_empty_features=True)] if impute else []) + [StandardScaler(), est]
    return make_pipeline(*steps)


def fit_probe(name: str, task: str, x: np.ndarray, y: np.ndarray, seed: int = 0, impute: bool = False):
    """Fits a probe; a multiclass draw with a single class gets a constant predictor."""
    from sklearn.dummy import DummyClassifier
    from sklearn.pipeline import make_pipeline

    kind = KIND[task]
    if kind == "multiclass" and len(np.unique(y)) < 2:
        model = make_pipeline(DummyClassifier(strategy="most_frequent"))
    else:
        model = make_probe(name, kind, len(y), seed, impute)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence of tiny probes, constant labels in a draw
        model.fit(x, y)
    return model


def label_scores(model, x: np.ndarray, n_labels: int) -> np.ndarray:
    """(chips, labels) scores of a multi-label model: probabilities, or decision values."""
    if not hasattr(model, "predict_proba"):
        p = model.decision_function(x)
    else:
        p = model.predict_proba(x)
        if isinstance(p, list):  # one (chips, classes) array per label, classes as seen in training
            est = model[-1] if hasattr(model, "steps") else model
            cols = []
            for q, classes in zip(p, est.classes_):
                hit = np.flatnonzero(np.asarray(classes) == 1)
                cols.append(q[:, hit[0]] if hit.size else np.zeros(len(q)))
            p = np.stack(cols, axis=1)
    p = np.asarray(p, np.float64).reshape(len(x), -1)
    if p.shape[1] != n_labels:
        raise ValueError(f"expected {n_labels} label scores, got {p.shape[1]}")
    return p


def score(task: str, model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of a fitted model on (x, y): accuracy + macro_f1, map, or rmse + r2."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, mean_squared_error, r2_score

    if len(y) == 0:
        return {}
    kind = KIND[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "multiclass":
            pred = model.predict(x)
            return {"accuracy": float(accuracy_score(y, pred)), "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
        if kind == "multilabel":
            p = label_scores(model, x, y.shape[1])
            cols = y.sum(axis=0) > 0
            ap = float(average_precision_score(y[:, cols], p[:, cols], average="macro")) if cols.any() else float("nan")
            return {"map": ap}
        pred = model.predict(x)
        r2 = float(r2_score(y, pred)) if len(y) > 1 and np.var(y) > 0 else float("nan")
        return {"rmse": float(np.sqrt(mean_squared_error(y, pred))), "r2": r2}


def _draw(train: np.ndarray, n: int, seed: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, draw, n])
    return np.sort(rng.choice(train, size=n, replace=False)) if n < len(train) else train


# ---------------------------------------------------------------------------------- curves

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


def summarize(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over draws per task, source, probe, n, evaluation split and metric."""
    g = curves.groupby(["task", "source", "probe", "n", "is_all", "split", "metric"], sort=True)["value"]
    return g.agg(mean="mean", std=lambda v: float(np.std(v)), draws="count").reset_index()


def _best_by_val(summary: pd.DataFrame, task: str, source: str, n: int | None = None) -> str | None:
    """The probe of `source` with the best mean val score at n (default n = all)."""
    metric, higher = _primary(task)
    s = summary[(summary.task == task) & (summary.source == source) & (summary["split"] == "val") & (summary.metric == metric)]
    s = s[s.is_all] if n is None else s[s.n == n]
    s = s.dropna(subset=["mean"])
    if s.empty:
        return None
    order = {p: i for i, p in enumerate(PROBES + ("cnn",))}
    s = s.assign(key=(-s["mean"] if higher else s["mean"]), o=s.probe.map(order)).sort_values(["key", "o"])
    return str(s.iloc[0].probe)


def _test_mean(summary: pd.DataFrame, task: str, source: str, probe: str, metric: str, n: int | None = None):
    s = summary[(summary.task == task) & (summary.source == source) & (summary.probe == probe) & (summary["split"] == "test")
                & (summary.metric == metric)]
    s = s[s.is_all] if n is None else s[s.n == n]
    return (float(s.iloc[0]["mean"]), float(s.iloc[0]["std"])) if len(s) else (float("nan"), float("nan"))


def embedding_curve(summary: pd.DataFrame, task: str) -> list[dict]:
    """Per n, the test score (mean, std) of the embedding probe with the best val score at that n."""
    metric, _ = _primary(task)
    out = []
    for n in sorted(summary[(summary.task == task) & (summary.source == "embeddings")].n.unique()):
        probe = _best_by_val(summary, task, "embeddings", int(n)) or "linear"
        mean, std = _test_mean(summary, task, "embeddings", probe, metric, int(n))
        out.append({"n": int(n), "probe": probe, "mean": mean, "std": std})
    return out


def label_savings(summary: pd.DataFrame, tasks) -> dict:
    """Per task and baseline: the baseline's test score with every train label, and the smallest
    n at which the embedding curve reaches it (None: not within the sizes tried)."""
    out = {}
    for task in tasks:
        metric, higher = _primary(task)
        curve = embedding_curve(summary, task)
        if not curve:
            continue
        n_all = curve[-1]["n"]
        res = {}
        for source in ("pixel_stats", "scratch"):
            probe = "cnn" if source == "scratch" else _best_by_val(summary, task, source)
            if probe is None:
                continue
            base, _ = _test_mean(summary, task, source, probe, metric)
            if not np.isfinite(base):
                continue
            reach = [c["n"] for c in curve if np.isfinite(c["mean"]) and (c["mean"] >= base if higher else c["mean"] <= base)]
            n = min(reach) if reach else None
            res[source] = {"baseline_probe": probe, "baseline_all": base, "n_all": n_all, "n_to_match": n,
                           "label_fraction": (n / n_all) if n else None}
        out[task] = res
    return out


def _mean_std(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f}" if not np.isfinite(std) or std == 0 else f"{mean:.3f} ± {std:.3f}"


def label_efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The curves as a table: per task, the test score of the primary metric (mean ± std over
    draws) at each n, for the embedding curve (best probe on val at each n) and each baseline's
    best probe on val (the CNN for scratch); columns n=25, ..., all."""
    rows = []
    for task in summary.task.unique():
        metric, higher = _primary(task)
        lines = {"embeddings": {c["n"]: (c["mean"], c["std"]) for c in embedding_curve(summary, task)}}
        for source in ("pixel_stats", "scratch"):
            part = summary[(summary.task == task) & (summary.source == source)]
            probe = "cnn" if source == "scratch" else _best_by_val(summary, task, source)
            if probe is None or part.empty:
                continue
            lines[f"{source} ({probe})"] = {int(n): _test_mean(summary, task, source, probe, metric, int(n))
                                            for n in sorted(part.n.unique())}
        n_all = int(summary[summary.task == task].n.max())
        for source, curve in lines.items():
            row = {"task": task, "metric": f"{metric} ({'higher' if higher else 'lower'} is better)", "features": source}
            row.update({("all" if n == n_all else f"n={n}"): _mean_std(*v) for n, v in sorted(curve.items())})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(summary: pd.DataFrame, tasks, out_dir: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = {"embeddings": "-", "pixel_stats": "--", "scratch": ":"}
    for task in tasks:
        metric, higher = _primary(task)
        s = summary[(summary.task == task) & (summary["split"] == "test") & (summary.metric == metric)]
        if s.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for (source, probe), part in s.groupby(["source", "probe"], sort=True):
            part = part.sort_values("n")
            line, = ax.plot(part.n, part["mean"], styles.get(source, "-"), marker="o", ms=3, label=f"{source}:{probe}")
            ax.fill_between(part.n, part["mean"] - part["std"], part["mean"] + part["std"], color=line.get_color(), alpha=0.12)
        ax.set_xscale("log")
        ticks = sorted(s.n.unique())
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled train chips (n)")
        ax.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{task} {title}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / f"curve_{task}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


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
    selected = {t: _best_by_val(summary, t, "embeddings") or cfg.probes[0] for t in cfg.tasks}
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


# ------------------------------------------------------------------------------------ MMD

def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def median_gamma(x: np.ndarray, y: np.ndarray) -> float:
    """RBF gamma = 1 / median squared distance of the pooled sample (the median heuristic)."""
    z = np.concatenate([x, y]).astype(np.float64)
    d = _sqdist(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.median(d)) if d.size else 1.0
    return 1.0 / med if med > 0 else 1.0


def mmd2_rbf(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """Unbiased squared MMD between samples x and y with k(a, b) = exp(-gamma |a - b|²);
    ~0 (it can be slightly negative) when both come from one distribution."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise InputError(f"{len(x)} and {len(y)} samples", "MMD needs at least two samples on each side")
    g = median_gamma(x, y) if gamma is None else gamma
    kxx, kyy, kxy = np.exp(-g * _sqdist(x, x)), np.exp(-g * _sqdist(y, y)), np.exp(-g * _sqdist(x, y))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def mmd_permutation_pvalue(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> float:
    """p-value of MMD² under the null of one distribution (pooled sample, shuffled labels)."""
    g = median_gamma(x, y)
    observed = mmd2_rbf(x, y, g)
    z = np.concatenate([x, y])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(len(z))
        hits += mmd2_rbf(z[p[:len(x)]], z[p[len(x):]], g) >= observed
    return (hits + 1) / (permutations + 1)


# ------------------------------------------------------------------------- region transfer

REGION_TASKS = ("landcover", "water", "tree_cover")
SYNTH_REGION_PAIRS = (("A", "B_same"), ("A", "B_shifted"), ("B_same", "A"), ("B_shifted", "A"))


@dataclass
class Region:
    """One region's chips: features (chips, dim; NaN = missing), labels (LABEL_COLUMNS), and
    boolean masks of the chips a probe trains on and of the held-out chips it is tested on."""
    name: str
    x: np.ndarray
    labels: pd.DataFrame
    train: np.ndarray
    test: np.ndarray


def _check_region_args(tasks: tuple[str, ...], probe: str, axis: str = "x") -> None:
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise InputError(",".join(bad), f"unknown task(s): choose from {list(TASKS)}")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    if axis not in ("x", "y"):
        raise InputError(axis, "axis must be x (west/east) or y (south/north)")


def _shift(a: Region, b: Region, seed: int) -> dict[str, float]:
    """Shift from a's train chips to all of b's chips (and, for reference, to a's held-out chips),
    in features standardized by a's train mean and std (a missing value counts as the mean)."""
    xa = a.x[a.train].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features
        mu, sd = np.nanmean(xa, 0), np.nanstd(xa, 0) + 1e-8

    def z(x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - mu) / sd, nan=0.0, posinf=0.0, neginf=0.0)

    za, zb, zin = z(xa), z(b.x), z(a.x[a.test])
    return {"mmd2": mmd2_rbf(za, zb), "mmd2_in_region": mmd2_rbf(za, zin),
            "mmd_pvalue": mmd_permutation_pvalue(za, zb, permutations=100, seed=seed),
            "mean_distance": float(np.linalg.norm(zb.mean(0))), "mean_distance_in_region": float(np.linalg.norm(zin.mean(0)))}


def region_transfer(regions: dict[str, Region], pairs, tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear",
                    seed: int = 0, tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "sarflow-downstream",
                    out_dir: str | None = None, lineage_store: str | None = None, params: dict | None = None,
                    tags: dict | None = None, extra: dict | None = None) -> dict:
    """For each (a, b) of `pairs`: a probe trained on a's train chips, tested on a's held-out
    chips (in-region) and on b's (out-of-region); the error gap next to the shift from a to b:
    unbiased MMD² (RBF, median heuristic) with a permutation p-value, and the distance between
    the mean features in units of a's train std (`_shift`).

    Error = 1 - macro-F1 for landcover, 1 - mAP for presence, RMSE for regressions. Writes
    region_generalization.csv and region.json into `out_dir`, logs a MLflow run
    "region-generalization" (lineage of `lineage_store`, `params`, `tags`, the table as
    artifact downstream/region_generalization.csv) and returns {"rows", "shift", "table",
    "json", "run_id", **extra}."""
    import mlflow

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    _check_region_args(tasks, probe)
    unknown = {r for pair in pairs for r in pair} - set(regions)
    if unknown:
        raise InputError(",".join(sorted(unknown)), f"unknown region(s): have {sorted(regions)}")
    for r in regions.values():
        if r.train.sum() < 2 or r.test.sum() < 2:
            raise InputError(r.name, f"region {r.name} has {int(r.train.sum())} train and {int(r.test.sum())} held-out "
                                     "chips: at least 2 of each are needed")
    impute = any(np.isnan(r.x).any() for r in regions.values())
    rows, shift, fits = [], {}, {}
    for a, b in pairs:
        ra, rb = regions[a], regions[b]
        shift[f"{a}->{b}"] = _shift(ra, rb, seed)
        for task in tasks:
            ya, va = task_target(task, ra.labels, a)
            yb, vb = task_target(task, rb.labels, b)
            tr, ia, ib = ra.train & va, ra.test & va, rb.test & vb
            if tr.sum() < 2 or not ia.any() or not ib.any():
                continue
            if (a, task) not in fits:  # one probe per training region and task, whatever it is tested on
                fits[a, task] = fit_probe(probe, task, ra.x[tr], ya[tr], seed=seed, impute=impute)
            m = fits[a, task]
            metric, higher = _primary(task)
            s_in, s_out = score(task, m, ra.x[ia], ya[ia])[metric], score(task, m, rb.x[ib], yb[ib])[metric]
            err_in, err_out = (1 - s_in, 1 - s_out) if higher else (s_in, s_out)
            rows.append({"train": a, "test_out": b, "task": task, "probe": probe, "metric": metric,
                         "in_region": s_in, "out_region": s_out, "error_in": err_in, "error_out": err_out,
                         "error_gap": err_out - err_in, "n_train": int(tr.sum()), "n_in": int(ia.sum()),
                         "n_out": int(ib.sum()), **shift[f"{a}->{b}"]})
    table = pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-region-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "region_generalization.csv"
    table.to_csv(path, index=False)
    lineage = dataset_lineage(lineage_store) if lineage_store else {}
    exp_id = setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name="region-generalization", tags={**lineage, **(tags or {})}) as run:
        mlflow.log_params({"probe": probe, "seed": seed, "tasks": ",".join(tasks), **(params or {})})
        for r in rows:
            key = f"{r['task']}_{r['train']}_to_{r['test_out']}"
            mlflow.log_metrics({f"{key}_error_in": r["error_in"], f"{key}_error_out": r["error_out"],
                                f"{key}_error_gap": r["error_gap"]})
        for k, v in shift.items():
            mlflow.log_metrics({f"{k.replace('->', '_to_')}_{m}": float(x) for m, x in v.items()})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        if len(table):
            mlflow.log_table(table, artifact_file="downstream/region_generalization.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "shift": shift, **(extra or {})}
    (out / "region.json").write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(out / "region.json")
    return result


def _probe_region(name: str, data: ProbeData) -> Region:
    return Region(name, data.x, data.labels, data.split == "train", data.split == "test")


def run_region_generalization(store: str, features_root: str, tracking_uri: str = "sqlite:///mlflow.db",
                              model: str | None = None, version: str | None = None,
                              tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear",
                              axis: str = "x", holdout: float = 0.3, seed: int = 0,
                              experiment: str = "sarflow-downstream", out_dir: str | None = None,
                              other: str | None = None, other_features_root: str | None = None) -> dict:
    """Region transfer (`region_transfer`) on embeddings and labels read through Feast, as in
    `run_probes`, both ways between two regions:

    - without `other`: the two halves of the store's scene, west/east along `axis` x (or
      south/north for y), chips assigned by their centre; a `holdout` fraction of each half,
      drawn with `seed`, is held out, the rest trains;
    - with `other`: `store` (region A, embeddings under `features_root`) and `other` (region
      B, under `other_features_root`, default `features_root`); each store's train split
      trains and its test split is held out. Both must have embeddings of one model and
      version (`model`/`version`, default the newest in each root), else an InputError."""
    _check_region_args(tasks, probe, axis)
    if other is None:
        data = load_probe_data(store, features_root, model, version)
        coord = data.centroid[:, 0 if axis == "x" else 1]
        cut = float(np.median(coord))
        names = ("west", "east") if axis == "x" else ("south", "north")
        in_a = coord <= cut
        rng = np.random.default_rng(seed)
        held = np.zeros(len(coord), bool)
        for mask in (in_a, ~in_a):
            idx = np.flatnonzero(mask)
            held[rng.choice(idx, size=max(2, int(round(holdout * len(idx)))), replace=False)] = True
        regions = {n: Region(n, data.x, data.labels, mask & ~held, mask & held) for n, mask in zip(names, (in_a, ~in_a))}
        params = {"regions": "halves", "axis": axis, "holdout": holdout, "cut": cut}
        embeddings = {"model": data.model, "version": data.version}
    else:
        other_root = other_features_root or features_root
        pa, pb = _select_partition(features_root, model, version), _select_partition(other_root, model, version)
        if pa != pb:
            raise InputError(f"{features_root} | {other_root}",
                             f"the regions' embeddings differ: {store} has {pa[0]} v{pa[1]} (under {features_root}), "
                             f"{other} has {pb[0]} v{pb[1]} (under {other_root}); embed both with one model and "
                             "version, or choose one with --model/--version")
        regions = {"A": _probe_region("A", load_probe_data(store, features_root, *pa)),
                   "B": _probe_region("B", load_probe_data(other, other_root, *pb))}
        names = ("A", "B")
        params = {"regions": "stores", "store_A": store, "store_B": other, "features_root_A": features_root,
                  "features_root_B": other_root}
        embeddings = {"model": pa[0], "version": pa[1]}
    return region_transfer(regions, (names, names[::-1]), tasks, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=store, params=params,
                           tags={"sarflow.embeddings_model": embeddings["model"],
                                 "sarflow.embeddings_version": embeddings["version"]},
                           extra={"embeddings": embeddings})


def run_region_stores(stores: dict[str, str], pairs=SYNTH_REGION_PAIRS, encoder_uri: str | None = None,
                      tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear", seed: int = 0,
                      tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "sarflow-downstream",
                      out_dir: str | None = None) -> dict:
    """Region transfer between whole stores (region name -> store; e.g. `synth_region_stores`)
    on features computed from the chips, no Feast needed: `ablation_features` of every
    modality (raw-pixel statistics, or the encoder `encoder_uri`), labels from `chip_labels`;
    each store's train split trains and its test split is held out."""
    _check_region_args(tasks, probe)
    regions = {}
    for name, store in stores.items():
        labels, split = store_labels(store)
        regions[name] = Region(name, ablation_features(store, ABLATION_SETS["fused"], encoder_uri), labels,
                               split == "train", split == "test")
    features = encoder_uri or "pixel_stats"
    return region_transfer(regions, pairs, tasks, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=next(iter(stores.values())),
                           params={"regions": "stores", "features": features, **{f"store_{k}": v for k, v in stores.items()}},
                           tags={"sarflow.features": features}, extra={"features": features, "stores": dict(stores)})


# ------------------------------------------------------------------------- modality ablation

ABLATION_SETS = {"sar": ("s1grd", "s1coh"), "optical": ("s2rgb",), "fused": ("s1grd", "s1coh", "s2rgb")}


def ablation_features(store: str, modalities: tuple[str, ...], encoder_uri: str | None = None) -> np.ndarray:
    """Features of every chip (store order) from only `modalities`: raw-pixel statistics, or,
    with `encoder_uri`, a multimodal ChipEncoder (e.g. CLIP) given NaN for every group whose
    modality is dropped (NaN = missing, as the encoder expects)."""
    from sarflow.downstream.baselines import pixel_statistics

    if encoder_uri is None:
        return pixel_statistics(store, modalities)[0]
    import mlflow
    import torch

    from sarflow.data.chipstore import open_chip_group

    encoder = mlflow.pytorch.load_model(encoder_uri, map_location="cpu").eval()
    group = open_chip_group(store)
    parts = []
    for (_, bands), modality in zip(encoder.groups, encoder.modalities):
        arr = group[modality]
        idx = [list(arr.attrs["bands"]).index(b) for b in bands]
        x = arr[:][:, idx].astype(np.float32)
        if modality not in modalities:
            x[:] = np.nan
        parts.append(x)
    if not any(m in modalities for m in encoder.modalities):
        raise InputError(encoder_uri, f"the encoder has none of the modalities {list(modalities)} (it has {encoder.modalities})")
    x = np.concatenate(parts, axis=1)
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 256):
            out.append(encoder(torch.from_numpy(x[s:s + 256])).numpy())
    return np.concatenate(out).astype(np.float32)


def _synth_store(base: Path, cfg, options=None) -> str:
    """Synthesizes a scene (`SynthConfig` cfg) under base/scene and tiles it into base/chips.zarr."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import synthesize
    from sarflow.data.tile import TileOptions, tile

    cat = synthesize(base / "scene", cfg)
    return str(tile(load_catalog(cat), base / "chips.zarr", options or TileOptions(), show_progress=False))


def synth_ablation_stores(folder: str | Path, size_px: int = 384, seed: int = 7, chip_size: int = 32,
                          clouded: float = 0.6) -> dict[str, str]:
    """Two synthetic scenes with the same seed (so the same land cover), one without clouds and
    one with `clouded` cloud cover, tiled into stores: {"clear": store, "clouded": store}."""
    from sarflow.data.synth import SynthConfig

    return {cond: _synth_store(Path(folder) / cond, SynthConfig(size_px=size_px, seed=seed, chip_size=chip_size,
                                                               cloud_fraction=frac))
            for cond, frac in (("clear", 0.0), ("clouded", clouded))}


def shifted_priors(shift: float) -> dict[int, float]:
    """Class-prior factors of a shifted region: built-up and water x (1 + shift), trees / (1 + shift)."""
    if not shift >= 0:
        raise InputError(str(shift), "shift must be at least 0")
    return {50: 1 + shift, 80: 1 + shift, 10: 1 / (1 + shift)}


def synth_region_stores(folder: str | Path, size_px: int = 384, seed_a: int = 7, seed_b: int = 8, shift: float = 2.0,
                        chip_size: int = 32) -> dict[str, str]:
    """Three synthetic regions tiled into stores: {"A": seed_a, "B_same": seed_b with the same
    class mix, "B_shifted": seed_b with `shifted_priors(shift)`} (B_same and B_shifted share
    their random fields: they differ by the class mix only). Block-split with 2x2-chip cells
    and 30% test chips, so that small scenes have enough held-out chips."""
    from sarflow.data.synth import SynthConfig
    from sarflow.data.tile import TileOptions

    if seed_a == seed_b:
        raise InputError(str(seed_b), "seed_b must differ from seed_a (region B is another scene)")
    options = TileOptions(split_block=2, split_fractions=(0.6, 0.1, 0.3))
    configs = {"A": SynthConfig(size_px=size_px, seed=seed_a, chip_size=chip_size),
               "B_same": SynthConfig(size_px=size_px, seed=seed_b, chip_size=chip_size),
               "B_shifted": SynthConfig(size_px=size_px, seed=seed_b, chip_size=chip_size,
                                        class_prior_scale=shifted_priors(shift))}
    return {name: _synth_store(Path(folder) / name, cfg, options) for name, cfg in configs.items()}


def store_labels(store: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels (`chip_labels`) and split of every chip of the store, in store order."""
    from sarflow.features.labels import chip_labels
    from sarflow.data.chipstore import read_chip_table

    with tempfile.TemporaryDirectory() as tmp:
        labels = pd.read_parquet(chip_labels(store, tmp))
    chips = read_chip_table(store).sort_values("index").reset_index(drop=True)
    labels = labels.set_index("chip_id").reindex(chips.chip_id).reset_index(drop=True)
    return labels, chips["split"].to_numpy()


def run_ablation(stores: dict[str, str], tracking_uri: str = "sqlite:///mlflow.db", encoder_uri: str | None = None,
                 probe: str = "linear", draws: int = 3, seed: int = 0, experiment: str = "sarflow-downstream",
                 out_dir: str | None = None) -> dict:
    """Modality ablation: SAR-only vs optical-only vs fused features, per cloud condition.

    `stores` maps a condition name (e.g. "clear", "clouded") to a chip store; the labels come
    from each store (`chip_labels`). Features: raw-pixel statistics per modality set by
    default (fast, no training), or a registered multimodal encoder (`encoder_uri`, e.g.
    models:/sarflow-encoder-clip/1) fed NaN for the dropped modality. A `probe` is trained on
    the train split (`draws` seeds for the MLP; linear and kNN are deterministic) and scored
    on the test split: landcover macro-F1 and water RMSE. Table (modality x condition) logged
    to MLflow."""
    import mlflow

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    if not stores:
        raise InputError("stores", "no stores to ablate on")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    rows = []
    for cond, store in stores.items():
        labels, split = store_labels(store)
        for mset, mods in ABLATION_SETS.items():
            feats = ablation_features(store, mods, encoder_uri)
            row = {"condition": cond, "modalities": mset}
            for task, metric in (("landcover", "macro_f1"), ("water", "rmse")):
                y, valid = task_target(task, labels, store)
                tr, te = valid & (split == "train"), valid & (split == "test")
                vals = [score(task, fit_probe(probe, task, feats[tr], y[tr], seed=seed + d, impute=True),
                              feats[te], y[te])[metric] for d in range(draws if probe == "mlp" else 1)]
                row[f"{task}_{metric}"] = float(np.mean(vals))
            rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "modality_ablation.csv"
    table.to_csv(path, index=False)
    first = next(iter(stores.values()))
    exp_id = setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name="modality-ablation", tags=dataset_lineage(first)) as run:
        mlflow.log_params({"features": encoder_uri or "pixel_stats", "probe": probe, "draws": draws,
                           **{f"store_{c}": s for c, s in stores.items()}})
        for r in rows:
            mlflow.log_metrics({f"{r['condition']}_{r['modalities']}_landcover_test_macro_f1": r["landcover_macro_f1"],
                                f"{r['condition']}_{r['modalities']}_water_test_rmse": r["water_rmse"]})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        mlflow.log_table(table, artifact_file="downstream/modality_ablation.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "features": encoder_uri or "pixel_stats"}
    (out / "ablation.json").write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(out / "ablation.json")
    return result

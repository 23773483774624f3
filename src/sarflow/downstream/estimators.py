"""The probes themselves: linear / kNN / small-MLP estimators for a task's kind, fitted and
scored (accuracy + macro-F1, mAP, or RMSE + R²). `task` is a `tasks.Task` or its kind
("multiclass", "multilabel", "regression").
"""

from __future__ import annotations

import warnings

import numpy as np

from sarflow.downstream.tasks import Task

PROBES = ("linear", "knn", "mlp")
KINDS = ("multiclass", "multilabel", "regression")


def task_kind(task: Task | str) -> str:
    kind = task.kind if isinstance(task, Task) else task
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}: one of {KINDS}")
    return kind


def fittable(task: Task | str, y: np.ndarray) -> bool:
    """Whether a training draw can teach anything: two classes (multiclass), a class present in
    some chips and absent in others (multilabel), a target that varies (regression)."""
    kind = task_kind(task)
    if len(y) < 2:
        return False
    if kind == "multiclass":
        return len(np.unique(y)) > 1
    if kind == "multilabel":
        present = np.asarray(y).sum(axis=0)
        return bool(((present > 0) & (present < len(y))).any())
    return bool(np.nanstd(np.asarray(y, np.float64)) > 0)


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


def fit_probe(name: str, task: Task | str, x: np.ndarray, y: np.ndarray, seed: int = 0, impute: bool = False):
    """Fits a probe. A draw that cannot teach anything (`fittable`: one class, a constant target)
    is refused: callers skip such points instead of scoring a constant predictor."""
    kind = task_kind(task)
    if not fittable(kind, y):
        raise ValueError(f"a {kind} probe needs a training draw with two classes or a varying target "
                         f"({len(y)} chips given)")
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


def model_output(task: Task | str, model, x: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """What the metrics are computed from: predicted classes (multiclass), label scores
    (multilabel: `n_labels` columns) or predicted values (regression)."""
    kind = task_kind(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "multilabel":
            return label_scores(model, x, n_labels)
        return np.asarray(model.predict(x))


def output_metrics(task: Task | str, y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Metrics of a model's `model_output` on targets y: accuracy + macro_f1, map, or rmse + r2."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, mean_squared_error, r2_score

    if len(y) == 0:
        return {}
    kind = task_kind(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "multiclass":
            return {"accuracy": float(accuracy_score(y, out)), "macro_f1": float(f1_score(y, out, average="macro", zero_division=0))}
        if kind == "multilabel":
            cols = y.sum(axis=0) > 0
            ap = float(average_precision_score(y[:, cols], out[:, cols], average="macro")) if cols.any() else float("nan")
            return {"map": ap}
        r2 = float(r2_score(y, out)) if len(y) > 1 and np.var(y) > 0 else float("nan")
        return {"rmse": float(np.sqrt(mean_squared_error(y, out))), "r2": r2}


def score(task: Task | str, model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of a fitted model on (x, y): accuracy + macro_f1, map, or rmse + r2."""
    if len(y) == 0:
        return {}
    return output_metrics(task, y, model_output(task, model, x, y.shape[1] if np.ndim(y) > 1 else None))


def weighted_metrics(task: Task | str, y: np.ndarray, out: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of `output_metrics` under chip weights `w` (replicates, chips) (e.g. how many
    times a bootstrap drew each chip's block): one value per replicate. With every weight 1 they
    equal `output_metrics` (a class counts where it has weight, in the truth or the predictions)."""
    kind = task_kind(task)
    w = np.atleast_2d(np.asarray(w, np.float64))
    total = w.sum(1)
    with np.errstate(all="ignore"):
        if kind == "multiclass":
            classes = np.unique(np.concatenate([np.asarray(y), np.asarray(out)]))
            t = (np.asarray(y)[:, None] == classes[None]).astype(np.float64)
            p = (np.asarray(out)[:, None] == classes[None]).astype(np.float64)
            tp, true, pred = w @ (t * p), w @ t, w @ p
            seen = (true + pred) > 0
            f1 = np.where(seen, 2 * tp / np.where(seen, true + pred, 1), 0.0)
            return {"accuracy": tp.sum(1) / total, "macro_f1": f1.sum(1) / seen.sum(1)}
        if kind == "multilabel":
            return {"map": np.array([_weighted_map(np.asarray(y), out, wi) for wi in w])}
        y, out = np.asarray(y, np.float64), np.asarray(out, np.float64)
        sse = w @ (y - out) ** 2
        sy, syy = w @ y, w @ y ** 2
        sst = syy - sy ** 2 / total
        r2 = np.where(sst > 1e-12 * np.maximum(syy, 1e-300), 1 - sse / sst, np.nan)
        return {"rmse": np.sqrt(sse / total), "r2": r2}


def _weighted_map(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> float:
    """Macro average precision (as sklearn's, ties grouped) over the labels with weighted positives."""
    aps = []
    for j in range(y.shape[1]):
        pos = y[:, j] > 0
        if not (w * pos).sum() > 0:
            continue
        order = np.argsort(-scores[:, j], kind="mergesort")
        s, tp_w = scores[order, j], (w * pos)[order]
        tp, allw = np.cumsum(tp_w), np.cumsum(w[order])
        last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each distinct score
        tp, allw = tp[last], allw[last]
        keep = allw > 0
        precision = np.where(keep, tp / np.where(keep, allw, 1), 0.0)
        recall = tp / tp[-1]
        aps.append(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))
    return float(np.mean(aps)) if aps else float("nan")

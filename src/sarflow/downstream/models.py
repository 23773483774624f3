"""Logging and registering downstream models: the one way every downstream and LLP model
reaches the MLflow registry.

`log_downstream_model` logs a fitted model inside the active MLflow run, in a format that
loads back as a predicting model (scikit-learn estimators with the sklearn flavour, torch
modules with the pytorch flavour, pickled so they load back as the module, not an exported
graph), with a signature inferred from a real input example and its prediction, and registers
it as ``sarflow-<task>``. The registered version carries the lineage tags of the run (dataset
version, catalog hash, code commit), the evaluation set it was scored on and its metrics as
``sarflow.metric.<name>`` tags: exactly what `sarflow promote` (registry.promote) compares.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sarflow.errors import InputError
from sarflow.mlops.registry import DATASET_TAG, EVAL_TAG
from sarflow.mlops.tracking import model_requirements

REGISTERED_PREFIX = "sarflow-"


def registered_name(task: str) -> str:
    """`worldcover` -> `sarflow-worldcover` (already prefixed names are kept; a task's own
    name is `Task.registered_name`)."""
    return task if task.startswith(REGISTERED_PREFIX) else REGISTERED_PREFIX + task


def dataset_id(lineage: dict[str, str]) -> str:
    """The dataset part of an evaluation set: the store's DVC hash, or for a store DVC does not
    track, its catalog hash (`catalog-<hash>`: tiling is deterministic, so one catalog is one
    dataset), never one shared "untracked" that would make two unversioned stores comparable."""
    md5 = lineage.get("sarflow.dataset_dvc_md5", "untracked")
    if md5 and md5 != "untracked":
        return md5
    return f"catalog-{lineage.get('sarflow.catalog_hash', 'unknown')[:16]}"


def evaluation_set(dataset_version: str, split: str, task: str) -> str:
    """The evaluation set a model is scored on: `<dataset md5>:<split>:<task>`. It names the data
    and the task, never the encoder or embeddings, so the gate compares encoders on one set."""
    for part, what in ((dataset_version, "dataset version"), (split, "split"), (task, "task")):
        if not part or ":" in str(part):
            raise ValueError(f"evaluation set: the {what} {part!r} must be non-empty and contain no ':'")
    return f"{dataset_version}:{split}:{task}"


def log_downstream_model(model, task: str, example: np.ndarray, *, lineage: dict[str, str], eval_set: str,
                         metrics: dict[str, float], predict: Callable[[np.ndarray], np.ndarray] | None = None,
                         artifact_name: str = "model", register: bool = True) -> dict:
    """Logs `model` (sklearn estimator or torch module) in the active run and registers it.

    `example` is a small real input batch (float32); `predict` computes the output used for the
    signature (default: ``model.predict`` for sklearn, a forward pass for torch). `lineage` are
    the run's ``sarflow.*`` tags (tracking.dataset_lineage); `eval_set` names the evaluation set
    (`evaluation_set`: ``"<dataset md5>:test:<task>"``) so the promotion gate compares like with like. Returns
    ``{"name", "version", "model_uri"}`` (version None when not registered). The first metric is the
    primary one: a non-finite one is refused (nothing logged or registered); other non-finite
    metrics are left out."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    example = np.ascontiguousarray(example, dtype=np.float32)
    name = registered_name(task)
    if mlflow.active_run() is None:
        raise RuntimeError("log_downstream_model needs an active MLflow run")
    primary, value = next(iter(metrics.items()), (None, None))
    if primary is None or not np.isfinite(float(value)):
        raise InputError(eval_set, f"{task}: the primary metric {primary} is {value}: a model whose score its "
                                   "split cannot measure is not logged or registered")
    metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}
    for key, value in metrics.items():
        mlflow.log_metric(key, value)
    if isinstance(model, torch.nn.Module):
        model = model.cpu().eval()
        if predict is None:
            def predict(x):
                with torch.no_grad():
                    return model(torch.from_numpy(x)).numpy()
        out = predict(example)
        info = mlflow.pytorch.log_model(model, name=artifact_name, signature=infer_signature(example, out),
                                        input_example=example, serialization_format="pickle",
                                        pip_requirements=model_requirements(),
                                        registered_model_name=name if register else None)
    else:
        out = (predict or model.predict)(example)
        info = mlflow.sklearn.log_model(model, name=artifact_name, signature=infer_signature(example, out),
                                        input_example=example, pip_requirements=model_requirements(),
                                        registered_model_name=name if register else None)
    version = None
    if register:
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        tags = {**lineage, EVAL_TAG: eval_set}
        tags.setdefault(DATASET_TAG, "untracked")
        tags.update({f"sarflow.metric.{k}": repr(float(v)) for k, v in metrics.items()})
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
    return {"name": name, "version": version, "model_uri": info.model_uri}

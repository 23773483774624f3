"""Component `pretrain-encoder`: self-supervised pretraining (MAE, DINO or CLIP-style) of an
encoder on a chip store, tracked in MLflow and registered as ``sarflow-encoder-<method>``.

Thin wrapper over :func:`sarflow.training.pretrain.pretrain`. The ``pretrain`` parameter is
params.yaml's ``pretrain:`` section as a dict (method, modalities, groups, batch_size, vit, optim,
methods: the inputs default to every input source of the store); the
``encoder`` output is a ``dsl.Model`` whose file is a JSON reference to the registered model
(the registry, not the pipeline root, is where models live). On a cluster this task runs on a
GPU node (pipelines/training.py sets the accelerator, node selector and toleration); the
library uses the GPU (bf16) when one is visible.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)  # a GPU task: the CUDA image
def pretrain_encoder(
    store: Input[Dataset],
    encoder: Output[Model],
    metrics: Output[Metrics],
    pretrain: dict = {},
    tracking_uri: str = "",
    dataset_version: str = "",
    dataset_git_commit: str = "",
) -> NamedTuple("Encoder", [("model_uri", str), ("registered_model", str), ("version", str), ("run_id", str)]):
    """Trains, tracks and registers the encoder. `dataset_version` and `dataset_git_commit` are
    the version task's outputs (the store's DVC md5, the data commit), recorded as the run's
    lineage by value (a fresh pod has no DVC repository to discover them from); the version is
    part of the task's cache key too, so a new dataset version always retrains."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components.paths import absolute_uri
    from sarflow.mlops.lineage import given_lineage
    from sarflow.params import Params, stage_config
    from sarflow.training.pretrain import PretrainConfig
    from sarflow.training.pretrain import pretrain as run_pretrain

    cfg = stage_config(PretrainConfig, Params({"pretrain": pretrain}, "pipeline parameter pretrain"), "pretrain",
                       {"tracking_uri": tracking_uri or None}, store=store.path)
    tracking_uri = absolute_uri(cfg.tracking_uri)  # recorded in the reference: the same database from any folder
    with given_lineage(dataset_version, dataset_git_commit):
        result = run_pretrain(cfg)
    ref = {"model_uri": f"models:/{result['registered_model']}/{result['version']}",
           "registered_model": result["registered_model"], "version": str(result["version"]),
           "run_id": result["run_id"], "logged_model_uri": result["model_uri"], "tracking_uri": tracking_uri,
           "embedding_dim": result["embedding_dim"], "channels": result["channels"],
           "dataset_version": dataset_version or result["lineage"].get("sarflow.dataset_dvc_md5", "")}
    Path(encoder.path).parent.mkdir(parents=True, exist_ok=True)
    Path(encoder.path).write_text(json.dumps(ref, indent=1))
    encoder.metadata.update({k: v for k, v in ref.items() if not isinstance(v, list)})
    metrics.log_metric("first_loss", float(result["losses"][0]))
    metrics.log_metric("final_loss", float(result["losses"][-1]))
    metrics.log_metric("steps", len(result["losses"]))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    out = namedtuple("Encoder", ["model_uri", "registered_model", "version", "run_id"])
    return out(ref["model_uri"], ref["registered_model"], ref["version"], ref["run_id"])

"""What several component bodies share, imported inside their tasks.

No ``@dsl.component`` may be defined here: inside a task, KFP's runtime makes ``kfp.dsl`` expose
only its runtime types, so a module that defines components cannot be imported by a component
body (``components/embed.py`` importing ``components/pretrain.py`` would fail in the task). Like
``components/paths.py``, this module imports only the standard library at the top.
"""

from __future__ import annotations


def embedding_setup(encoder_path: str, options: dict, features_root: str, tracking_uri: str):
    """(config, encoder reference, absolute features root) of an embedding task: params.yaml's
    `embed:` section (`options`), the `encoder` reference pretrain-encoder wrote, and MLflow set to
    the tracking URI (the task's, else the reference's). A relative path or SQLite file means the
    task's working directory (the launcher's, under kfp.local)."""
    import json
    from pathlib import Path

    import mlflow

    from components.paths import absolute, absolute_uri
    from sarflow.features.embed import EmbedConfig
    from sarflow.params import Params, stage_config

    features_root, tracking_uri = absolute(features_root), absolute_uri(tracking_uri)
    ref = json.loads(Path(encoder_path).read_text())
    cfg = stage_config(EmbedConfig, Params({"embed": options}, "pipeline parameter embed"), "embed",
                       {"tracking_uri": tracking_uri or ref.get("tracking_uri") or None})
    mlflow.set_tracking_uri(cfg.tracking_uri)
    return cfg, ref, features_root


def write_encoder_artifact(ref: dict, encoder) -> None:
    """The Model artifact the embedding tasks read: the reference as a JSON file, its scalars as metadata."""
    import json
    from pathlib import Path

    Path(encoder.path).parent.mkdir(parents=True, exist_ok=True)
    Path(encoder.path).write_text(json.dumps(ref, indent=1))
    encoder.metadata.update({k: v for k, v in ref.items() if not isinstance(v, list)})


def write_encoder_reference(result: dict, encoder, metrics, tracking_uri: str, dataset_version: str) -> dict:
    """The `encoder` output (a JSON reference to the registered model: the registry, not the
    pipeline root, is where models live) and the loss metrics, from what `pretrain` returned (or
    `distributed.trainjob_result` for a TrainJob's run); returns the reference."""
    import json
    from pathlib import Path

    ref = {"model_uri": f"models:/{result['registered_model']}/{result['version']}",
           "registered_model": result["registered_model"], "version": str(result["version"]),
           "run_id": result["run_id"], "logged_model_uri": result["model_uri"], "tracking_uri": tracking_uri,
           "embedding_dim": result["embedding_dim"], "channels": result["channels"],
           "dataset_version": dataset_version or result["lineage"].get("sarflow.dataset_dvc_md5", "")}
    write_encoder_artifact(ref, encoder)
    metrics.log_metric("first_loss", float(result["losses"][0]))
    metrics.log_metric("final_loss", float(result["losses"][-1]))
    metrics.log_metric("steps", len(result["losses"]))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return ref


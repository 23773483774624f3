"""Component `embed-chips`: embed every chip of a store with a registered encoder and write the
embeddings (and the chips' label features) into the features root: Feast's offline source.

Thin wrapper over :func:`sarflow.features.embed.embed_store` and
:func:`sarflow.features.labels.chip_labels`. The features root is shared state, like a
bucket (a local folder on the embedded default, ``s3://`` on a cluster); the ``embeddings``
output is a JSON descriptor of the partition written (model, version, rows, dimension).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)  # a GPU task: the CUDA image
def embed_chips(
    store: Input[Dataset],
    encoder: Input[Model],
    embeddings: Output[Dataset],
    metrics: Output[Metrics],
    features_root: str,
    tracking_uri: str = "",
    options: dict = {},
    dataset_version: str = "",
    dataset_git_commit: str = "",
):
    """Embeds every chip with the encoder the `encoder` reference names; writes chip labels too.
    `options` is params.yaml's `embed:` section (batch_size, device, tracking_uri);
    `dataset_version`/`dataset_git_commit`: the version task's outputs, the partition's lineage."""
    import json
    from pathlib import Path

    import mlflow

    from components.paths import absolute, absolute_uri
    from sarflow.features.embed import EmbedConfig, embed_store
    from sarflow.features.labels import chip_labels
    from sarflow.mlops.lineage import given_lineage
    from sarflow.params import Params, stage_config

    # a relative path or SQLite file means the task's working directory (the launcher's, under kfp.local)
    features_root, tracking_uri = absolute(features_root), absolute_uri(tracking_uri)
    ref = json.loads(Path(encoder.path).read_text())
    cfg = stage_config(EmbedConfig, Params({"embed": options}, "pipeline parameter embed"), "embed",
                       {"tracking_uri": tracking_uri or ref.get("tracking_uri") or None})
    mlflow.set_tracking_uri(cfg.tracking_uri)
    with given_lineage(dataset_version, dataset_git_commit):
        result = embed_store(store.path, ref["model_uri"], features_root, batch_size=cfg.batch_size, overwrite=True,
                             device=cfg.device)
    labels = chip_labels(store.path, features_root)
    result.update({"features_root": features_root, "labels": str(labels), "model_uri": ref["model_uri"]})
    Path(embeddings.path).parent.mkdir(parents=True, exist_ok=True)
    Path(embeddings.path).write_text(json.dumps(result, indent=1, default=str))
    embeddings.metadata.update({k: v for k, v in result.items() if isinstance(v, (str, int, float))})
    metrics.log_metric("rows", int(result["rows"]))
    metrics.log_metric("dim", int(result["dim"]))
    metrics.log_metric("chips_per_s", float(result["chips_per_s"]))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__

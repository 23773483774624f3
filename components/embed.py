"""Component `embed-chips`: embed every chip of a store with a registered encoder and write the
embeddings (and the chips' label features) into the features root: Feast's offline source; and
the fan-out the pipelines run, `plan-embed` -> `embed-shards` per shard range (one GPU each) ->
`publish-embeddings` (see below).

Thin wrapper over :func:`sarflow.features.embed.embed_store` and
:func:`sarflow.features.labels.chip_labels`. The features root is shared state, like a
bucket (a local folder on the embedded default, ``s3://`` on a cluster); the ``embeddings``
output is a JSON descriptor of the partition written (model, version, rows, dimension).
"""

from typing import List

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
    `options` is params.yaml's `embed:` section (batch_size, device, workers, readers, tracking_uri);
    `dataset_version`/`dataset_git_commit`: the version task's outputs, the partition's lineage."""
    import json
    from pathlib import Path

    from components.common import embedding_setup
    from sarflow.features.embed import embed_store
    from sarflow.features.labels import chip_labels
    from sarflow.mlops.lineage import given_lineage

    cfg, ref, features_root = embedding_setup(encoder.path, options, features_root, tracking_uri)
    with given_lineage(dataset_version, dataset_git_commit):
        result = embed_store(store.path, ref["model_uri"], features_root, batch_size=cfg.batch_size, overwrite=True,
                             device=cfg.device, workers=cfg.workers, readers=cfg.readers)
    labels = chip_labels(store.path, features_root)
    result.update({"features_root": features_root, "labels": str(labels), "model_uri": ref["model_uri"]})
    Path(embeddings.path).parent.mkdir(parents=True, exist_ok=True)
    Path(embeddings.path).write_text(json.dumps(result, indent=1, default=str))
    embeddings.metadata.update({k: v for k, v in result.items() if isinstance(v, (str, int, float))})
    metrics.log_metric("rows", int(result["rows"]))
    metrics.log_metric("dim", int(result["dim"]))
    metrics.log_metric("chips_per_s", float(result["chips_per_s"]))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__


# ---------------------------------------------------------------- the fan-out: plan -> one GPU task per shard range -> publish
# The parts are staged under the features root (shared state, like the tiled store of components/tile.py):
# each `embed-shards` task writes its own part, `publish-embeddings` checks they cover the store once and
# publishes them as the partition every later task reads (its `embeddings` output: the same descriptor
# `embed-chips` writes).

@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def plan_embed(store: Input[Dataset], options: dict = {}) -> List[str]:
    """The store's chip shards split into `options['parts']` (params.yaml's `embed.parts`, default 1)
    contiguous ranges `A:B`: the ParallelFor's items (one range: the whole store in one task). The one
    return value (kfp.local loops over a task's `Output` only, not over a named output)."""
    from sarflow.features.embed import EmbedConfig, shard_ranges
    from sarflow.params import Params, stage_config

    cfg = stage_config(EmbedConfig, Params({"embed": options}, "pipeline parameter embed"), "embed")
    ranges = [f"{a}:{b}" for a, b in shard_ranges(store.path, cfg.parts)]
    print(f"embedding fans out over {len(ranges)} shard range(s): {' '.join(ranges)}")
    return ranges


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)  # a GPU task: the CUDA image
def embed_shards(
    store: Input[Dataset],
    encoder: Input[Model],
    metrics: Output[Metrics],
    shards: str,
    features_root: str,
    tracking_uri: str = "",
    options: dict = {},
    dataset_version: str = "",
    dataset_git_commit: str = "",
) -> str:
    """Embeds the chips of store shards `shards` (`A:B`) into a staged part (a rerun replaces it);
    returns the part's JSON descriptor (model, version, shards, rows, dim), for `publish-embeddings`."""
    import json
    from pathlib import Path

    from components.common import embedding_setup
    from sarflow.features.embed import embed_store, parse_shards
    from sarflow.mlops.lineage import given_lineage

    cfg, ref, features_root = embedding_setup(encoder.path, options, features_root, tracking_uri)
    with given_lineage(dataset_version, dataset_git_commit):
        result = embed_store(store.path, ref["model_uri"], features_root, batch_size=cfg.batch_size,
                             device=cfg.device, shards=parse_shards(shards), workers=cfg.workers, readers=cfg.readers,
                             overwrite=True)
    metrics.log_metric("rows", int(result["rows"]))
    metrics.log_metric("dim", int(result["dim"]))
    metrics.log_metric("chips_per_s", float(result["chips_per_s"]))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return json.dumps({k: result[k] for k in ("model", "version", "shards", "rows", "dim", "part", "device",
                                              "chips_per_s")}, default=str)


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def publish_embeddings(
    store: Input[Dataset],
    encoder: Input[Model],
    embeddings: Output[Dataset],
    metrics: Output[Metrics],
    parts: List[str],
    features_root: str,
) -> str:
    """After every `embed-shards` task (`parts`: their Collected descriptors): publishes the staged
    parts as the encoder's partition (refused, nothing published, on a gap, an overlap or a mixed
    model, version or dimension), writes the chip labels, and describes the partition in
    `embeddings` as `embed-chips` does; returns the partition."""
    import json
    from pathlib import Path

    from components.paths import absolute
    from sarflow.errors import InputError
    from sarflow.features.embed import finalize_embeddings
    from sarflow.features.labels import chip_labels

    features_root = absolute(features_root)
    ref = json.loads(Path(encoder.path).read_text())
    described = [json.loads(p) for p in parts]
    models = sorted({(d["model"], str(d["version"])) for d in described})
    if len(models) != 1:
        raise InputError(features_root, f"the embedding parts come from {len(models)} model versions {models}, not one")
    (model, version), = models
    result = finalize_embeddings(features_root, model, version, overwrite=True)
    labels = chip_labels(store.path, features_root)
    dims = {int(d["dim"]) for d in described}
    result.update({"dim": dims.pop(), "parts": len(described), "features_root": features_root, "labels": str(labels),
                   "model_uri": ref["model_uri"], "device": described[0]["device"],
                   "chips_per_s": sum(float(d["chips_per_s"]) for d in described)})
    Path(embeddings.path).parent.mkdir(parents=True, exist_ok=True)
    Path(embeddings.path).write_text(json.dumps(result, indent=1, default=str))
    embeddings.metadata.update({k: v for k, v in result.items() if isinstance(v, (str, int, float))})
    metrics.log_metric("rows", int(result["rows"]))
    metrics.log_metric("dim", int(result["dim"]))
    metrics.log_metric("parts", len(described))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return str(result["partition"])

"""The end-to-end pipeline: one synthetic AOI (or your catalog) through every stage.

data plane (pipelines/data.py: synth -> ingest -> tile -> version) followed by the training
stages (pipelines/training.py: pretrain -> embed, fanned out over params `embed.parts` shard
ranges, one GPU each, then published -> materialize, fanned out over the parts -> probes + LLP ->
promote -> publish; `sarflow demo` keeps `embed.parts: 1`, one embedding task). This is what `make demo` runs with kfp.local on the embedded default (MLflow on
SQLite, Feast on SQLite, a local DVC remote, features in a local folder), and what a cluster
runs against MinIO, the MLflow server and Redis.

``e2e_catalog_pipeline`` is the same on a user's data: the scene folder (``catalog.yaml`` and
the rasters it references, plus the polygons and statistics table for LLP) is imported
instead of synthesised.

Both take the training pipeline's pretraining switch (``trainjob_nodes``: 0, the default, pretrains
in a GPU task; more runs a Kubeflow Trainer TrainJob on that many nodes, pipelines/training.py). Its
nodes read the tile task's store by the URI the tile task returns (the launcher never downloads the
store), so run the pipeline with its root on the sarflow MinIO (``s3://...``).
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset

from pipelines.data import chip_stages, data_stages
from pipelines.platform import exit_task
from pipelines.training import TRAINJOB_RUNTIME, training_stages

PIPELINE_NAME = "sarflow-e2e"
# synth/tile/promote: their keys become arguments; pretrain/embed/downstream/llp: passed whole (inputs of
# those names). `features:` is not read: a pipeline's features root and online store are its arguments.
PARAMS_SECTIONS = {"e2e_pipeline": ("synth", "tile", "pretrain", "embed", "downstream", "llp", "promote"),
                   "e2e_catalog_pipeline": ("tile", "pretrain", "embed", "downstream", "llp", "promote")}
PARAMS_NOT_ARGUMENTS = {"promote.lock_uri": "the gate's task reads $SARFLOW_PROMOTION_LOCK from its environment"}


@dsl.pipeline(name=PIPELINE_NAME, description="sarflow end to end: synthetic AOI -> chip store -> SSL -> Feast -> downstream + LLP -> registry")
def e2e_pipeline(
    seed: int = 0,
    size_px: int = 512,
    chip_size: int = 64,
    cloud_fraction: float = 0.3,
    seasons: List[str] = ["summer", "winter"],
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 4,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    codec: str = "zstd",
    clevel: int = 3,
    checksum: bool = True,
    dvc_remote: str = "",
    s3_endpoint: str = "",
    tracking_uri: str = "",
    features_root: str = "s3://sarflow-features",
    pretrain: dict = {},
    embed: dict = {},
    downstream: dict = {},
    llp: dict = {},
    online: str = "redis",
    redis: str = "redis.sarflow.svc:6379",
    margin: float = 0.0,
    trainjob_nodes: int = 0,
    trainjob_gpus_per_node: int = 1,
    trainjob_runtime: str = TRAINJOB_RUNTIME,
    failure_log: str = "",
):
    with dsl.ExitHandler(exit_task(failure_log), name="end-to-end"):
        synth = dict(size_px=size_px, chip_size=chip_size, cloud_fraction=cloud_fraction, seasons=seasons)
        tile = dict(workers=workers, shard_chips=shard_chips, block_chips=block_chips, split_block=split_block,
                    split_fractions=split_fractions, codec=codec, clevel=clevel)
        data = data_stages(seed, synth, tile, checksum, dvc_remote, s3_endpoint)
        training_stages(data["tile"].outputs["store"], data["synth"].outputs["scene"],
                        data["version"].outputs["dvc_md5"], data["version"].outputs["git_commit"],
                        tracking_uri=tracking_uri,
                        features_root=features_root, pretrain=pretrain, embed=embed, downstream=downstream, llp=llp,
                        online=online, redis=redis, margin=margin, store_uri=data["tile"].outputs["Output"],
                        trainjob=(trainjob_nodes, trainjob_gpus_per_node, trainjob_runtime))


@dsl.pipeline(name="sarflow-e2e-catalog", description="sarflow end to end on your own catalog")
def e2e_catalog_pipeline(
    scene_uri: str,
    catalog: str = "catalog.yaml",
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 4,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    codec: str = "zstd",
    clevel: int = 3,
    checksum: bool = True,
    dvc_remote: str = "",
    s3_endpoint: str = "",
    tracking_uri: str = "",
    features_root: str = "s3://sarflow-features",
    pretrain: dict = {},
    embed: dict = {},
    downstream: dict = {},
    llp: dict = {},
    online: str = "redis",
    redis: str = "redis.sarflow.svc:6379",
    margin: float = 0.0,
    trainjob_nodes: int = 0,
    trainjob_gpus_per_node: int = 1,
    trainjob_runtime: str = TRAINJOB_RUNTIME,
    failure_log: str = "",
):
    with dsl.ExitHandler(exit_task(failure_log), name="end-to-end"):
        scene = dsl.importer(artifact_uri=scene_uri, artifact_class=Dataset, reimport=False,
                             metadata={"catalog": catalog})
        scene.set_display_name("scene")
        tile = dict(workers=workers, shard_chips=shard_chips, block_chips=block_chips, split_block=split_block,
                    split_fractions=split_fractions, codec=codec, clevel=clevel)
        chips = chip_stages(scene.output, tile, checksum, dvc_remote, s3_endpoint)
        training_stages(chips["tile"].outputs["store"], scene.output, chips["version"].outputs["dvc_md5"],
                        chips["version"].outputs["git_commit"], tracking_uri=tracking_uri,
                        features_root=features_root, pretrain=pretrain, embed=embed, downstream=downstream, llp=llp,
                        online=online, redis=redis, margin=margin, store_uri=chips["tile"].outputs["Output"],
                        trainjob=(trainjob_nodes, trainjob_gpus_per_node, trainjob_runtime))

"""The data pipeline: synth -> ingest -> tile -> version, fanned out over scene seeds.

```
exit handler (record-status: always runs, records the final state and any failure)
└── ParallelFor seed in seeds
    ├── synth-scene(seed)        -> scene  (Dataset, folder with catalog.yaml)
    ├── ingest-scene(scene)      -> manifest (Artifact), metrics   (gate: validate first)
    ├── tile-scene(scene)        -> store  (Dataset, Zarr v3 chip store folder), metrics
    │       .after(ingest-scene)
    └── version-chips(store)     -> version (Artifact JSON), metrics, dvc_md5/git_commit/catalog_hash
```

Every stage is a component from ``components/`` (a thin wrapper over the library); this
module only wires them and sets the platform details:

- **caching** keyed on inputs: synth, ingest and tile enable KFP caching (the key is the
  component spec plus its input parameters and artifacts, so the same seed and options
  reuse the scene and the store); version and the exit task never cache (they have side
  effects: a push to the remote, a failure record);
- **secrets and endpoints** (pipelines/platform.py): tasks that may touch object storage
  (ingest, tile, version) get the MinIO keys from the Kubernetes secret ``sarflow-s3`` and
  the endpoints from the ConfigMap ``sarflow-pipeline-env``; a non-empty ``s3_endpoint``
  parameter overrides the endpoint. On a cluster pass ``dvc_remote=s3://sarflow-dvc``: the
  DVC repository lives in the pod, the pushed remote is what stays;
- **resources**: CPU/memory requests and limits per task (``platform.RESOURCES``), and the pod label
  ``sarflow.io/pipeline=true`` that k8s/'s NetworkPolicies require to reach MinIO.

Local runs (``kfp.local``, SubprocessRunner(use_venv=False)): kfp 2.17's local
orchestrator runs this very pipeline, ParallelFor (iterations in parallel threads, up to
``PARALLELISM``) and ExitHandler (the exit task gets a real PipelineTaskFinalStatus, also
when the body fails and ``raise_on_error=False``) included, so there is no separate local
variant. What kfp.local does *not* do, and the cluster does: it ignores the Kubernetes
platform config (the secret is not mounted: the task inherits the caller's environment, so
export ``AWS_*`` yourself), ignores CPU/memory limits and the image (tasks run in the
current interpreter), and caches only when ``kfp.local.init(enable_caching=True)``.
"""

from typing import List

from kfp import dsl

from components.ingest import ingest_scene
from components.tile import (checksum_inputs, finalize_tiles, list_checksum_parts, plan_tiles, screen_tiles, survey_tiles, tile_units_job,
                             write_tile_units)
from components.synth import synth_scene
from components.tile import tile_scene
from components.version import version_chips
from pipelines.platform import exit_task, stage

PIPELINE_NAME = "sarflow-data"
PARAMS_SECTIONS = {"data_pipeline": ("synth", "tile"), "tile_pipeline": ("tile",)}  # params.yaml sections -> arguments
PARAMS_NOT_ARGUMENTS = {"synth.seed": "the data pipeline fans out over `seeds`"}
PARALLELISM = 4  # scenes tiled at once


def chip_stages(scene, tile: dict, checksum, dvc_remote, s3_endpoint) -> dict[str, dsl.PipelineTask]:
    """ingest -> tile -> version of a scene (a Dataset channel: a folder with its catalog);
    `tile` holds the tile-scene arguments (params.yaml's `tile:` keys)."""
    ingest = ingest_scene(scene=scene, checksum=checksum, s3_endpoint=s3_endpoint)
    stage(ingest, "ingest", "ingest", cache=True)

    tiled = tile_scene(scene=scene, **tile, checksum=checksum, s3_endpoint=s3_endpoint)
    tiled.after(ingest)  # ingest is the gate: bad inputs fail before any tiling
    stage(tiled, "tile", "tile", cache=True)

    version = version_chips(store=tiled.outputs["store"], remote=dvc_remote, s3_endpoint=s3_endpoint)
    stage(version, "version", "version", cache=False)
    return {"ingest": ingest, "tile": tiled, "version": version}


def data_stages(seed, synth: dict, tile: dict, checksum, dvc_remote, s3_endpoint) -> dict[str, dsl.PipelineTask]:
    """synth, then the chip stages, for one scene (the data pipeline's loop body, and the first
    half of the end-to-end pipeline); `synth` holds the synth-scene arguments but the seed."""
    scene = synth_scene(seed=seed, **synth)
    stage(scene, "synth", "synth", cache=True, services=False)
    return {"synth": scene, **chip_stages(scene.outputs["scene"], tile, checksum, dvc_remote, s3_endpoint)}


@dsl.pipeline(name=PIPELINE_NAME, description="sarflow data plane: synthetic scenes -> ingest -> chip stores -> DVC versions")
def data_pipeline(
    seeds: List[int] = [0, 1],
    size_px: int = 512,
    chip_size: int = 64,
    cloud_fraction: float = 0.3,
    seasons: List[str] = ["summer", "winter"],
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 0,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    codec: str = "zstd",
    clevel: int = 3,
    checksum: bool = True,
    dvc_remote: str = "",
    s3_endpoint: str = "",
    failure_log: str = "",
):
    synth = dict(size_px=size_px, chip_size=chip_size, cloud_fraction=cloud_fraction, seasons=seasons)
    tile = dict(workers=workers, shard_chips=shard_chips, block_chips=block_chips, split_block=split_block,
                split_fractions=split_fractions, codec=codec, clevel=clevel)
    with dsl.ExitHandler(exit_task(failure_log), name="data-plane"):
        with dsl.ParallelFor(seeds, parallelism=PARALLELISM, name="scenes") as seed:
            data_stages(seed, synth, tile, checksum, dvc_remote, s3_endpoint)


# ---------------------------------------------------------------- one catalog, tiled by many workers

TILE_PIPELINE_NAME = "sarflow-tile"
UNIT_PARALLELISM = 8  # unit tasks at once (ParallelFor's parallelism is fixed when the pipeline compiles)


@dsl.pipeline(name=TILE_PIPELINE_NAME,
              description="sarflow tiling fanned out: one task per part of the input files' checksums -> "
                          "survey -> one task per screening part -> plan -> "
                          "one task per run of consecutive units of whole shards -> "
                          "finalize, into one store by URI")
def tile_pipeline(
    catalog: str,
    store_uri: str,
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 0,
    window_px: int = 1024,
    unit_shards: int = 0,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    codec: str = "zstd",
    clevel: int = 3,
    checksum: bool = True,
    overwrite: bool = False,
    checksum_parts: int = 8,
    screen_parts: int = 8,
    runs: int = 32,
    max_loop_units: int = 200,
    job_image: str = "ghcr.io/sarflow/sarflow:0.1.0",
    job_parallelism: int = 64,
    s3_endpoint: str = "",
):
    """`store_uri` (s3://bucket/prefix on a cluster, a shared folder locally) is a string, not an artifact:
    every task writes its own shards straight into it (one writer per shard). The inputs' checksums fan
    out first: one task hashes each of up to `checksum_parts` parts of the input files (8 at once) into
    the store's build, where the survey takes them. The plan's reading of the required sources fans out
    next: the survey cuts the grid's blocks into `screen_parts` parts, one
    task screens each (8 at once), and the plan task finishes the plan. A task writes a run of
    consecutive units (a block two units of a run share is warped once: more runs balance better,
    fewer warp less twice). Up to `max_loop_units` units are cut into `runs` runs that fan out as a
    ParallelFor (8 tasks at once); beyond, one task runs a Kubernetes Indexed Job of the same unit
    runner, `job_parallelism` pods at once, with 4 runs per pod slot (tile_units.job_runs). finalize
    waits for every run (dsl.Collected)."""

    listed = list_checksum_parts(catalog=catalog, parts=checksum_parts, checksum=checksum, s3_endpoint=s3_endpoint)
    stage(listed, "checksum-parts", "tile", cache=False)
    with dsl.ParallelFor(listed.output, parallelism=UNIT_PARALLELISM, name="checksums") as part:
        hashed = checksum_inputs(catalog=catalog, store_uri=store_uri, part=part, parts=checksum_parts,
                                 checksum=checksum, overwrite=overwrite, workers=workers, s3_endpoint=s3_endpoint)
        stage(hashed, "checksum", "tile", cache=False)
    surveyed = survey_tiles(catalog=catalog, store_uri=store_uri, workers=workers, shard_chips=shard_chips,
                            block_chips=block_chips, window_px=window_px, unit_shards=unit_shards,
                            split_block=split_block, split_fractions=split_fractions, codec=codec, clevel=clevel,
                            checksum=checksum, overwrite=overwrite, parts=screen_parts, s3_endpoint=s3_endpoint,
                            checksummed=dsl.Collected(hashed.output))
    stage(surveyed, "survey", "tile", cache=False)
    with dsl.ParallelFor(surveyed.output, parallelism=UNIT_PARALLELISM, name="screening") as part:
        screened = screen_tiles(store_uri=store_uri, part=part, workers=workers, s3_endpoint=s3_endpoint)
        stage(screened, "screen", "tile", cache=False)
    planned = plan_tiles(store_uri=store_uri, screened=dsl.Collected(screened.output), runs=runs,
                         s3_endpoint=s3_endpoint)
    stage(planned, "plan", "tile", cache=False)
    count = planned.outputs["count"]
    with dsl.If(planned.outputs["units"] <= max_loop_units, name="units-in-a-loop"):
        with dsl.ParallelFor(planned.outputs["runs"], parallelism=UNIT_PARALLELISM, name="runs") as run:
            written = write_tile_units(store_uri=store_uri, run=run, runs=count, workers=workers,
                                       s3_endpoint=s3_endpoint)
            stage(written, "tile-units", "tile", cache=False)
        done = finalize_tiles(store_uri=store_uri, runs=dsl.Collected(written.output), s3_endpoint=s3_endpoint)
        stage(done, "finalize", "tile", cache=False)
    with dsl.Else(name="units-in-a-job"):
        job = tile_units_job(store_uri=store_uri, units=planned.outputs["units"], image=job_image,
                             parallelism=job_parallelism)
        stage(job, "tile-units-job", "tile", cache=False)
        done = finalize_tiles(store_uri=store_uri, runs=job.output, s3_endpoint=s3_endpoint)
        stage(done, "finalize", "tile", cache=False)

"""Components of tiling: `tile-scene` (one task) and the fan-out `list-checksum-parts` -> `checksum-inputs`
per part of the input files -> `survey-tiles` -> `screen-tiles` per
part of the grid -> `plan-tiles` -> `write-tile-units` per run of units (or `tile-units-job`, a
Kubernetes Indexed Job) -> `finalize-tiles`, into one store by URI.

Thin wrapper over :func:`sarflow.data.tile.tile`. The chip store is a folder-valued
``dsl.Dataset``: the library builds it in ``<store>.partial/`` beside the artifact path and
renames it into place, so the artifact appears whole or not at all.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def tile_scene(
    scene: Input[Dataset],
    store: Output[Dataset],
    metrics: Output[Metrics],
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 0,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    codec: str = "zstd",
    clevel: int = 3,
    checksum: bool = True,
    s3_endpoint: str = "",
) -> str:
    """Tiles the scene's catalog into the `store` folder (a sharded Zarr v3 chip store); returns the
    store's URI, for tasks that hand it on without downloading the artifact (a TrainJob's launcher)."""
    import json
    import os
    from pathlib import Path

    if s3_endpoint:  # credentials come from the environment (the sarflow-minio secret)
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.catalog import catalog_path, load_catalog
    from sarflow.data.chipstore import open_store
    from sarflow.data.tile import TileOptions, tile
    from sarflow.params import Params, stage_config

    catalog = catalog_path(scene.path, scene.metadata.get("catalog", "catalog.yaml"))
    section = {"workers": workers, "shard_chips": shard_chips, "block_chips": block_chips, "split_block": split_block,
               "split_fractions": split_fractions, "codec": codec, "clevel": clevel, "checksum": checksum}
    options = stage_config(TileOptions, Params({"tile": section}, "tile-scene parameters"), "tile", overwrite=True)
    os.makedirs(os.path.dirname(store.path), exist_ok=True)
    out = tile(load_catalog(catalog), store.path, options, show_progress=False)
    summary = open_store(out).summary()
    store.metadata.update({
        "chips": summary["chips"],
        "catalog_hash": summary["catalog_hash"],
        "crs": summary["crs"],
        "resolution": summary["resolution"],
        "chip_size": summary["chip_size"],
        "modalities": sorted(summary["modalities"]),
    })
    metrics.log_metric("chips", summary["chips"])
    for split, n in summary["splits"].items():
        metrics.log_metric(f"chips_{split}", n)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    return store.uri


# ---------------------------------------------------------------- the fan-out: survey -> screening parts -> plan -> units -> finalize
# The store is passed by URI (a string: s3://bucket/prefix on a cluster, a shared path locally),
# never as an artifact: every task writes its own shards (or screened part) straight into it. A task
# writes a run of consecutive units (tile_units.unit_runs), so a block two of its units share is warped once.

@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def list_checksum_parts(catalog: str, parts: int = 8, checksum: bool = True, s3_endpoint: str = "") -> List[int]:
    """The checksum parts of the catalog's input files that hold a file (up to `parts`; the ParallelFor's
    items); one part, which does nothing, when `checksum` is off."""
    import os

    if not checksum:
        return [0]

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.catalog import load_catalog
    from sarflow.data.ingest import catalog_files

    return list(range(max(1, min(parts, len(catalog_files(load_catalog(catalog)))))))


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def checksum_inputs(catalog: str, store_uri: str, part: int, parts: int = 8, checksum: bool = True,
                    overwrite: bool = False, workers: int = 0, s3_endpoint: str = "") -> int:
    """Hashes part `part` of `parts` of the input files (in `workers` threads, 0: up to 8) into the store's
    build, where the survey takes the checksums (nothing when `checksum` is off); returns `part`."""
    import os

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import checksum_part

    if checksum:
        checksum_part(load_catalog(catalog), store_uri, part, max(1, parts), overwrite=overwrite, workers=workers or None)
    return part


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def survey_tiles(
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
    parts: int = 8,
    s3_endpoint: str = "",
    checksummed: List[int] = [],
) -> List[int]:
    """The plan's first step: ingests `catalog` (checksums: those `checksum-inputs` recorded are taken,
    `checksummed` being their Collected outputs) and cuts the grid's blocks into up to `parts` screening
    parts; returns the part numbers (the ParallelFor's items)."""
    import os

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions
    from sarflow.data.tile_units import survey
    from sarflow.params import Params, stage_config

    section = {"workers": workers, "shard_chips": shard_chips, "block_chips": block_chips, "window_px": window_px,
               "unit_shards": unit_shards, "split_block": split_block, "split_fractions": split_fractions,
               "codec": codec, "clevel": clevel, "checksum": checksum, "overwrite": overwrite}
    options = stage_config(TileOptions, Params({"tile": section}, "survey-tiles parameters"), "tile")
    return list(range(len(survey(load_catalog(catalog), store_uri, options, max(1, parts)).parts)))


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def screen_tiles(store_uri: str, part: int, workers: int = 0, s3_endpoint: str = "") -> int:
    """Screens part `part` of the survey (which candidate chips hold a valid pixel of every required
    source; a part screened already is left as it is); returns `part`."""
    import os

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.tile_units import screen_part

    screen_part(store_uri, part, workers=workers or None)
    return part


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def plan_tiles(store_uri: str, screened: List[int], runs: int = 32, s3_endpoint: str = ""
               ) -> NamedTuple("Plan", [("runs", List[int]), ("count", int), ("units", int)]):
    """After the screening parts (`screened`: the Collected outputs of the screen tasks): finishes the
    plan (every chip's index, the arrays, the units) and cuts its units into up to `runs` runs of
    consecutive units; returns the run numbers (the ParallelFor's items), how many, and the units."""
    import os
    from collections import namedtuple

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.tile_units import commit_plan, unit_runs

    n = len(commit_plan(store_uri).units)
    r = len(unit_runs(list(range(n)), max(1, runs)))  # at most one run a unit
    return namedtuple("Plan", ["runs", "count", "units"])(list(range(r)), r, n)


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def write_tile_units(store_uri: str, run: int, runs: int, workers: int = 0, s3_endpoint: str = "") -> int:
    """Warps and writes the shards of run `run` of `runs` (consecutive units) into the store (a unit
    already written is skipped, so a retried task does what is left); returns `run`."""
    import os

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.tile_units import run_of, run_units

    run_units(store_uri, run_of(store_uri, runs, run), workers=workers or None)
    return run


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def finalize_tiles(store_uri: str, runs: List[int], metrics: Output[Metrics], s3_endpoint: str = "") -> str:
    """After every run of units (`runs`: the Collected outputs of the unit tasks): chips.parquet,
    statistics, attributes; returns the store's URI."""
    import json
    import os
    from pathlib import Path

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.chipstore import open_chip_group
    from sarflow.data.tile_units import finalize

    uri = finalize(store_uri)
    attrs = open_chip_group(uri).attrs
    metrics.log_metric("chips", attrs["chips"])
    metrics.log_metric("runs", len(runs))
    for split, n in attrs["split"]["chips"].items():
        metrics.log_metric(f"chips_{split}", n)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))
    return uri


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def tile_units_job(store_uri: str, units: int, image: str = "ghcr.io/sarflow/sarflow:0.1.0",
                   parallelism: int = 16, namespace: str = "", timeout_s: int = 86400) -> List[int]:
    """Beyond what a ParallelFor should fan out (hundreds of iterations): one Kubernetes Indexed Job
    runs `sarflow tile-unit STORE --runs R` with one completion per run ($JOB_COMPLETION_INDEX),
    `parallelism` pods at once, R = `job_runs(units, parallelism)`; waits for it; returns the runs."""
    from sarflow.data.tile_units import job_runs, run_indexed_job

    runs = job_runs(units, parallelism)
    run_indexed_job(store_uri, runs, image=image, parallelism=parallelism, namespace=namespace or None,
                    timeout_s=timeout_s)
    return list(range(runs))

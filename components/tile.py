"""Component `tile-scene`: align every source onto the grid and write the Zarr v3 chip store.

Thin wrapper over :func:`sarflow.data.tile.tile`. The chip store is a folder-valued
``dsl.Dataset``: the library builds it in ``<store>.partial/`` beside the artifact path and
renames it into place, so the artifact appears whole or not at all.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def tile_scene(
    scene: Input[Dataset],
    store: Output[Dataset],
    metrics: Output[Metrics],
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 4,
    split_block: int = 0,
    split_fractions: List[float] = [0.8, 0.1, 0.1],
    clevel: int = 3,
    checksum: bool = True,
    s3_endpoint: str = "",
):
    """Tiles the scene's catalog into the `store` folder (a sharded Zarr v3 chip store)."""
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
               "split_fractions": split_fractions, "clevel": clevel, "checksum": checksum}
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

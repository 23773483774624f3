"""Component `synth-scene`: a synthetic scene (Sentinel-1/2, labels, catalog.yaml) from a seed.

Thin wrapper over :func:`sarflow.data.synth.synthesize`; the scene is a folder-valued
``dsl.Dataset`` whose ``catalog.yaml`` references its rasters by relative path, so the
folder stays valid wherever KFP copies it.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def synth_scene(
    scene: Output[Dataset],
    seed: int = 0,
    size_px: int = 512,
    chip_size: int = 64,
    cloud_fraction: float = 0.3,
    seasons: List[str] = ["summer", "winter"],
):
    """Writes a synthetic AOI into the `scene` folder (catalog.yaml + rasters)."""
    from pathlib import Path

    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.params import Params, stage_config

    # the KFP IR keeps numbers as doubles (a ParallelFor item may arrive as 3.0): stage_config reads them as written
    section = {"size_px": size_px, "seed": seed, "chip_size": chip_size, "cloud_fraction": cloud_fraction,
               "seasons": list(seasons)}
    cfg = stage_config(SynthConfig, Params({"synth": section}, "synth-scene parameters"), "synth")
    catalog = synthesize(Path(scene.path), cfg)
    scene.metadata.update({
        "catalog": Path(catalog).name,
        "catalog_hash": load_catalog(catalog).catalog.hash(),
        "seed": cfg.seed,
        "size_px": cfg.size_px,
        "chip_size": cfg.chip_size,
    })

"""Synthetic chip stores for the downstream checks: a clear and a clouded scene of one land cover
(modality ablation), and regions with the same or a shifted class mix (region transfer). Their
tasks are the synthetic scene's labels (`worldcover`, `vegetation`, `builtup`), derived like any
catalog's; the splits hold 30% test chips in 2x2-chip blocks so that small scenes can measure them.
"""

from __future__ import annotations

from pathlib import Path

from sarflow.errors import InputError

SMALL_SCENE_SPLIT = {"split_block": 2, "split_fractions": (0.6, 0.1, 0.3)}


def _synth_store(base: Path, cfg, options=None) -> str:
    """Synthesizes a scene (`SynthConfig` cfg) under base/scene and tiles it into base/chips.zarr."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import synthesize
    from sarflow.data.tile import TileOptions, tile

    cat = synthesize(base / "scene", cfg)
    return str(tile(load_catalog(cat), base / "chips.zarr", options or TileOptions(), show_progress=False))


def synth_ablation_stores(folder: str | Path, size_px: int = 384, seed: int = 7, chip_size: int = 32,
                          clouded: float = 0.6) -> dict[str, str]:
    """Two synthetic scenes with the same seed (so the same land cover), one without clouds and
    one with `clouded` cloud cover, tiled into stores (`SMALL_SCENE_SPLIT`): {"clear": store,
    "clouded": store}."""
    from sarflow.data.synth import SynthConfig, shifted_priors
    from sarflow.data.tile import TileOptions

    options = TileOptions(**SMALL_SCENE_SPLIT)
    return {cond: _synth_store(Path(folder) / cond, SynthConfig(size_px=size_px, seed=seed, chip_size=chip_size,
                                                               cloud_fraction=frac), options)
            for cond, frac in (("clear", 0.0), ("clouded", clouded))}


def synth_region_stores(folder: str | Path, size_px: int = 384, seed_a: int = 7, seed_b: int = 8, shift: float = 2.0,
                        chip_size: int = 32) -> dict[str, str]:
    """Three synthetic regions tiled into stores: {"A": seed_a, "B_same": seed_b with the same
    class mix, "B_shifted": seed_b with `shifted_priors(shift)`} (B_same and B_shifted share
    their random fields: they differ by the class mix only). Block-split with 2x2-chip cells
    and 30% test chips, so that small scenes have enough held-out chips."""
    from sarflow.data.synth import SynthConfig, shifted_priors
    from sarflow.data.tile import TileOptions

    if seed_a == seed_b:
        raise InputError(str(seed_b), "seed_b must differ from seed_a (region B is another scene)")
    if not shift >= 0:
        raise InputError(str(shift), "shift must be at least 0")
    options = TileOptions(**SMALL_SCENE_SPLIT)
    configs = {"A": SynthConfig(size_px=size_px, seed=seed_a, chip_size=chip_size),
               "B_same": SynthConfig(size_px=size_px, seed=seed_b, chip_size=chip_size),
               "B_shifted": SynthConfig(size_px=size_px, seed=seed_b, chip_size=chip_size,
                                        class_prior_scale=shifted_priors(shift))}
    return {name: _synth_store(Path(folder) / name, cfg, options) for name, cfg in configs.items()}

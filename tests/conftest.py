"""Shared fixtures: the real-data folder, a tiny synthetic scene and store, and real servers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("SARFLOW_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real test data not found at {REAL} (set SARFLOW_REAL_DATA)")
    return REAL


@pytest.fixture(scope="session")
def gdalwarp() -> str:
    exe = shutil.which("gdalwarp")
    if not exe:
        pytest.skip("gdalwarp not installed (Debian gdal-bin; `make setup` installs it)")
    return exe


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """A 384 px synthetic scene with 32 px chips; returns its catalog."""
    from sarflow.data.synth import SynthConfig, synthesize

    return synthesize(tmp_path_factory.mktemp("scene"), SynthConfig(size_px=384, seed=7, chip_size=32))


@pytest.fixture(scope="session")
def tiny_store(tiny_scene, tmp_path_factory) -> Path:
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    out = tmp_path_factory.mktemp("store") / "chips.zarr"
    return tile(load_catalog(tiny_scene), out, TileOptions(shard_chips=16), show_progress=False)


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """moto in server mode on 127.0.0.1 (no authentication: any key is accepted)."""
    from servers import start_moto, stop

    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield url
    stop(proc)

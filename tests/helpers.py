"""Test helpers: an independent reference (gdalwarp) and catalog writing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import rasterio
import yaml


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a chip store, say): its path relative to `root` -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def write_catalog(path: Path, grid: dict, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"grid": grid, "sources": sources}, sort_keys=False))
    return path


def gdalwarp_reference(src: str | list[str], out: Path, crs: str, res: float, extent: tuple, method: str,
                       dst_nodata=None, src_nodata=None, extra=()) -> np.ndarray:
    """Warps with GDAL's own command-line tool onto the same grid: the independent reference."""
    srcs = [src] if isinstance(src, str) else list(src)
    cmd = ["gdalwarp", "-q", "-overwrite", "-t_srs", crs, "-tr", repr(res), repr(res),
           "-te", *[repr(float(v)) for v in extent], "-r", method, "-of", "GTiff", *extra]
    if src_nodata is not None:
        cmd += ["-srcnodata", str(src_nodata)]
    if dst_nodata is not None:
        cmd += ["-dstnodata", str(dst_nodata)]
    subprocess.run(cmd + srcs + [str(out)], check=True, capture_output=True, text=True)
    with rasterio.open(out) as ds:
        return ds.read()


def chip_windows(table, res: float):
    """Full extent of the chips and each chip's (row, col) offset in it."""
    minx, maxy = table["minx"].min(), table["maxy"].max()
    maxx, miny = table["maxx"].max(), table["miny"].min()
    rows = np.rint((maxy - table["maxy"].to_numpy()) / res).astype(int)
    cols = np.rint((table["minx"].to_numpy() - minx) / res).astype(int)
    return (minx, miny, maxx, maxy), rows, cols


def tiny_encoder(tiny_store: Path, tmp: Path, version: bool = False) -> dict:
    """A copy of the tiny store under `tmp` (DVC-versioned with `version`) and a tiny MAE (2 steps)
    registered in MLflow on `tmp/mlflow.db`: {"store", "uri", "dataset_version"}."""
    import shutil

    from sarflow.data.versioning import version_store
    from sarflow.training.methods import OptimConfig
    from sarflow.training.pretrain import PretrainConfig, pretrain
    from sarflow.training.vit import ViTConfig

    store = tmp / "chips.zarr"
    shutil.copytree(tiny_store, store)
    md5 = version_store(store, repo=tmp, push=False)["dvc_md5"] if version else None
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    pretrain(PretrainConfig(store=str(store), method="mae", vit=ViTConfig(size="tiny", patch=8, depth=1, dim=32, heads=2),
                            batch_size=8, optim=OptimConfig(max_steps=2, warmup_steps=1), tracking_uri=uri,
                            method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
    return {"store": store, "uri": uri, "dataset_version": md5}


def tiny_features(tiny_store: Path, tmp: Path, model: str = "sarflow-encoder-mae") -> dict:
    """A DVC-versioned copy of the tiny store, a registered tiny MAE (2 steps), its embeddings
    and chip labels under `tmp/features`, applied in Feast (SQLite online store, nothing
    materialized yet); MLflow's tracking URI is left pointing at `tmp/mlflow.db`."""
    import mlflow

    from sarflow.features.embed import embed_store
    from sarflow.features.labels import chip_labels
    from sarflow.features.feast_store import FeatureConfig, apply

    encoded = tiny_encoder(tiny_store, tmp, version=True)
    store, uri = encoded["store"], encoded["uri"]
    mlflow.set_tracking_uri(uri)
    root = tmp / "features"
    embedded = embed_store(str(store), f"models:/{model}/1", root, batch_size=16)
    chip_labels(str(store), root)
    cfg = FeatureConfig(root=str(root))
    apply(cfg)
    return {"store": store, "root": root, "cfg": cfg, "embed": embedded, "uri": uri, "tmp": tmp,
            "dataset_version": encoded["dataset_version"]}


def use_moto(monkeypatch, moto_url: str) -> dict:
    """Points this process's S3 clients at the moto server on 127.0.0.1 (any key is accepted) and
    returns that environment for child processes (`{**os.environ, ...}`)."""
    import os

    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SARFLOW_S3_ENDPOINT", raising=False)
    return {**os.environ, **env}

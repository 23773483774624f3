"""`sarflow embed`: run a registered encoder over every chip of the store and write the
embeddings as a Parquet offline source, one partition per model version so versions never mix:

    <root>/embeddings/model=<name>/version=<version>/part-00000.parquet

Columns: chip_id, embedding (fixed-size list of float32), model_name, model_version,
dataset_version (the store's DVC hash), event_timestamp, lon, lat (chip centroid), split.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import torch

from sarflow.errors import InputError

log = logging.getLogger(__name__)
EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class ModelRef:
    uri: str
    name: str
    version: str


def resolve_model(uri: str) -> ModelRef:
    """models:/name/version, models:/name@alias or runs:/id/path -> name and version; clear error if absent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):]
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = rest.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            return ModelRef(uri=f"models:/{mv.name}/{mv.version}", name=mv.name, version=str(mv.version))
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            client.get_run(run_id)
            return ModelRef(uri=uri, name=f"run-{run_id}", version="0")
    except MlflowException as e:
        raise InputError(uri, f"no such model in the MLflow registry at {mlflow.get_tracking_uri()} ({e.error_code})") from None
    raise InputError(uri, "not a model URI: use models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")


def partition(root: str | Path, model: ModelRef) -> Path:
    return Path(root) / EMBEDDINGS / f"model={model.name}" / f"version={model.version}"


def embed_store(store: str, model_uri: str, root: str | Path, batch_size: int = 256, overwrite: bool = False,
                device: str | None = None) -> dict:
    """Embeds every chip; returns the partition path, rows, dimension and throughput."""
    import mlflow

    from sarflow.tracking import dataset_lineage
    from sarflow.training.data import open_chip_group, read_chip_table

    model = resolve_model(model_uri)
    out = partition(root, model)
    if out.exists() and not overwrite:
        raise InputError(str(out), f"embeddings of {model.name} v{model.version} already exist (use --overwrite)")
    encoder = mlflow.pytorch.load_model(model.uri, map_location="cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval()
    group = open_chip_group(store)
    table = read_chip_table(store).sort_values("index")
    arrays = []
    for (name, bands), modality in zip(encoder.groups, encoder.modalities):
        if modality not in group.attrs["modalities"]:
            raise InputError(store, f"the encoder needs modality {modality!r}, the store has {group.attrs['modalities']}")
        arr = group[modality]
        idx = [list(arr.attrs["bands"]).index(b) for b in bands]
        arrays.append((arr, idx))
    n = int(group.attrs["chips"])
    lineage = dataset_lineage(store)
    dataset_version = lineage["sarflow.dataset_dvc_md5"]
    t0 = time.perf_counter()
    embeddings = []
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = np.concatenate([arr[start:stop][:, idx] for arr, idx in arrays], axis=1).astype(np.float32)
            e = encoder(torch.from_numpy(x).to(device)).float().cpu().numpy()
            embeddings.append(e)
    emb = np.concatenate(embeddings).astype(np.float32)
    elapsed = time.perf_counter() - t0
    dim = emb.shape[1]
    centroids = shapely.centroid(shapely.from_wkb(table["geometry"].to_numpy()))
    lon, lat = shapely.get_x(centroids), shapely.get_y(centroids)
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    arrow = pa.table({
        "chip_id": pa.array(table["chip_id"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim).cast(pa.list_(pa.float32())),
        "model_name": pa.array([model.name] * n, pa.string()),
        "model_version": pa.array([model.version] * n, pa.string()),
        "dataset_version": pa.array([dataset_version] * n, pa.string()),
        "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
        "lon": pa.array(lon, pa.float64()),
        "lat": pa.array(lat, pa.float64()),
        "split": pa.array(table["split"].tolist(), pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    try:
        pq.write_table(arrow, tmp / "part-00000.parquet", row_group_size=65536)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("embedded %d chips with %s v%s in %.1fs (%.0f chips/s)", n, model.name, model.version, elapsed, n / elapsed)
    return {"partition": str(out), "rows": n, "dim": dim, "model": model.name, "version": model.version,
            "dataset_version": dataset_version, "chips_per_s": n / max(elapsed, 1e-9), "device": device}


def read_embeddings(root: str | Path, model_name: str, version: str) -> pa.Table:
    path = Path(root) / EMBEDDINGS / f"model={model_name}" / f"version={version}"
    if not path.is_dir():
        raise InputError(str(path), f"no embeddings for {model_name} v{version}")
    return pq.read_table(path)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    dim = len(col[0]) if len(col) else 0
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


"""Feast objects for sarflow: the `chip` entity, one `chip_embeddings_*` view per model version
found under the features root, `chip_labels`, `chip_bags`, and the feature services.

`feature_repo/definitions.py` exposes these to `feast apply`; `sarflow features` applies them
through the Python SDK. Sources are Parquet files under the features root: a local folder (the
embedded default) or an s3:// prefix (a cluster's MinIO). On S3 the sources are `s3://` paths
with `s3_endpoint_override` set from AWS_ENDPOINT_URL (or SARFLOW_S3_ENDPOINT), so Feast's file
offline store (dask + s3fs for historical retrieval, pyarrow's S3 filesystem for schemas) reads
them from that endpoint; the keys come from the AWS environment variables of whoever reads.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Float32, Float64, String
from feast.value_type import ValueType

from sarflow.errors import InputError
from sarflow.data.paths import check_root, exists, fs_path, is_remote, join, parquet_files
from sarflow.features.embed import embedding_partitions
from sarflow.features.labels import KEY_COLUMNS

LABELS = "labels"
BAGS = "bags"
BAGS_FILE = "chip_bags.parquet"  # the folder also holds chip_bags_geo.parquet (GeoParquet): not a source
TTL = timedelta(days=3650)
# chip_bags contract (features/bags.py): one row per chip
BAGS_SCHEMA = {"chip_id": pa.string(), "bag_ids": pa.list_(pa.string()), "bag_weights": pa.list_(pa.float64()),
               "area_fractions": pa.list_(pa.float64())}

chip = Entity(name="chip", join_keys=["chip_id"], value_type=ValueType.STRING,
              description="a chip of the sarflow grid (stable id: same grid cell, same id)")


def view_name(model: str, version: str) -> str:
    return "chip_embeddings_" + re.sub(r"[^a-z0-9]+", "_", f"{model.removeprefix('sarflow-encoder-')}_v{version}".lower())


def s3_endpoint() -> str:
    """The endpoint an s3:// source is read from: AWS_ENDPOINT_URL (or SARFLOW_S3_ENDPOINT); empty for AWS."""
    if not (os.environ.get("SARFLOW_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")):
        return ""
    from sarflow.data.storage import s3_settings

    return s3_settings().endpoint_url


def file_source(name: str, path: str | Path) -> FileSource:
    extra = {"s3_endpoint_override": s3_endpoint()} if is_remote(path) else {}
    return FileSource(name=name, path=str(path), timestamp_field="event_timestamp", **extra)


def _schema(path: str | Path) -> pa.Schema:
    fs, p = fs_path(path)
    return pq.read_schema(p, filesystem=fs)


def embeddings_view(model: str, version: str, path: str | Path) -> FeatureView:
    first = parquet_files(path)[0]
    fs, p = fs_path(first)
    pf = pq.ParquetFile(p, filesystem=fs)
    table = pf.read_row_group(0, columns=["embedding"]).slice(0, 1) if pf.num_row_groups else None
    dim = len(table.column("embedding")[0]) if table is not None and table.num_rows else 0
    return FeatureView(
        name=view_name(model, version), entities=[chip], ttl=TTL, online=True,
        source=file_source(f"{view_name(model, version)}_source", path),
        # only the vector is served online; lon/lat/split/versions stay in the offline source and
        # the similarity index's metadata (every extra online feature is another row per chip)
        schema=[Field(name="embedding", dtype=Array(Float32), vector_length=dim)],
        tags={"model_name": model, "model_version": version, "dim": str(dim)},
    )


def labels_view(root: str | Path) -> FeatureView | None:
    path = join(root, LABELS)
    files = parquet_files(path)
    if not files:
        return None
    schema = _schema(files[0])
    fields = [Field(name=n, dtype=Float64) for n in schema.names if n not in KEY_COLUMNS]
    return FeatureView(name="chip_labels", entities=[chip], ttl=TTL, online=True, schema=fields,
                       source=file_source("chip_labels_source", path))


def check_bags_schema(path: str | Path, schema: pa.Schema) -> None:
    """The chip_bags contract: chip_id, bag_ids list<string>, bag_weights and area_fractions
    list<double>, event_timestamp; anything else is refused naming the file and the column."""
    missing = [c for c in (*BAGS_SCHEMA, "event_timestamp") if c not in schema.names]
    if missing:
        raise InputError(str(path), f"chip_bags is missing column(s) {missing} (it has {schema.names})")
    for name, want in BAGS_SCHEMA.items():
        got = schema.field(name).type
        if pa.types.is_large_list(got) or pa.types.is_fixed_size_list(got):
            got = pa.list_(got.value_type)
        if got != want and not (pa.types.is_large_string(got) and want == pa.string()):
            raise InputError(str(path), f"chip_bags column {name!r} is {got}, the contract says {want}")
    if not pa.types.is_timestamp(schema.field("event_timestamp").type):
        raise InputError(str(path), f"chip_bags column 'event_timestamp' is {schema.field('event_timestamp').type}, not a timestamp")


def bags_view(root: str | Path) -> FeatureView | None:
    """`chip_bags` over <root>/bags/chip_bags.parquet (only that file: the GeoParquet beside it is not a source)."""
    path = join(root, BAGS, BAGS_FILE)
    if not exists(path):
        return None
    check_bags_schema(path, _schema(path))
    return FeatureView(name="chip_bags", entities=[chip], ttl=TTL, online=True,
                       schema=[Field(name="bag_ids", dtype=Array(String)), Field(name="bag_weights", dtype=Array(Float64)),
                               Field(name="area_fractions", dtype=Array(Float64))],
                       source=file_source("chip_bags_source", path))


def build(root: str | Path) -> list:
    """Every Feast object for the features under `root` (a local folder or an s3:// prefix)."""
    check_root(root)
    objects: list = [chip]
    views = [embeddings_view(m, v, p) for m, v, p in embedding_partitions(root)]
    objects += views
    labels = labels_view(root)
    bags = bags_view(root)
    objects += [v for v in (labels, bags) if v is not None]
    if views:
        newest = views[-1]
        objects.append(FeatureService(name="similarity", features=[newest[["embedding"]]]))
        if labels is not None:
            objects.append(FeatureService(name="downstream_training", features=[newest[["embedding"]], labels]))
        if bags is not None:
            objects.append(FeatureService(name="llp_training",
                                          features=[newest[["embedding"]], bags, *([labels] if labels is not None else [])]))
    return objects

"""Feast objects for sarflow: the `chip` entity, one `chip_embeddings_*` view per model version
found under the features root, `chip_labels`, and the feature services.

`feature_repo/definitions.py` exposes these to `feast apply`; `sarflow features` applies them
through the Python SDK. Sources are Parquet files under the features root (a local folder for
the embedded default, s3:// on a cluster).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Float32, Float64
from feast.value_type import ValueType

from sarflow.features.embed import EMBEDDINGS

LABELS = "labels"
TTL = timedelta(days=3650)

chip = Entity(name="chip", join_keys=["chip_id"], value_type=ValueType.STRING,
              description="a chip of the sarflow grid (stable id: same grid cell, same id)")


def view_name(model: str, version: str) -> str:
    return "chip_embeddings_" + re.sub(r"[^a-z0-9]+", "_", f"{model.removeprefix('sarflow-encoder-')}_v{version}".lower())


def embedding_partitions(root: str | Path) -> list[tuple[str, str, Path]]:
    base = Path(root) / EMBEDDINGS
    out = []
    for mdir in sorted(base.glob("model=*")):
        for vdir in sorted(mdir.glob("version=*")):
            if any(vdir.glob("*.parquet")):
                out.append((mdir.name.split("=", 1)[1], vdir.name.split("=", 1)[1], vdir))
    return out


def embeddings_view(model: str, version: str, path: Path) -> FeatureView:
    first = next(iter(sorted(path.glob("*.parquet"))))
    table = pq.read_table(first, columns=["embedding"]).slice(0, 1)
    dim = len(table.column("embedding")[0]) if table.num_rows else 0
    source = FileSource(name=f"{view_name(model, version)}_source", path=str(path), timestamp_field="event_timestamp")
    return FeatureView(
        name=view_name(model, version), entities=[chip], ttl=TTL, source=source, online=True,
        # only the vector is served online; lon/lat/split/versions stay in the offline source and
        # the similarity index's metadata (every extra online feature is another row per chip)
        schema=[Field(name="embedding", dtype=Array(Float32), vector_length=dim)],
        tags={"model_name": model, "model_version": version, "dim": str(dim)},
    )


def labels_view(root: str | Path) -> FeatureView | None:
    path = Path(root) / LABELS
    if not any(path.glob("*.parquet")):
        return None
    schema = pq.read_schema(next(iter(sorted(path.glob("*.parquet")))))
    fields = [Field(name=n, dtype=Float64) for n in schema.names if n.startswith(("frac_", "tree_", "builtup_", "water_"))]
    return FeatureView(name="chip_labels", entities=[chip], ttl=TTL, online=True, schema=fields,
                       source=FileSource(name="chip_labels_source", path=str(path), timestamp_field="event_timestamp"))


def build(root: str | Path) -> list:
    """Every Feast object for the features under `root`."""
    objects: list = [chip]
    views = [embeddings_view(m, v, p) for m, v, p in embedding_partitions(root)]
    objects += views
    labels = labels_view(root)
    if labels is not None:
        objects.append(labels)
    if views:
        newest = views[-1]
        objects.append(FeatureService(name="similarity", features=[newest[["embedding"]]]))
        if labels is not None:
            objects.append(FeatureService(name="downstream_training", features=[newest[["embedding"]], labels]))
    return objects

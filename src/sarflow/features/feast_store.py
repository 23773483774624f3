"""The feature store: Feast configured for the embedded default (SQLite online store) or the
cluster (Redis online store), streaming materialization, online and historical retrieval.

Materialization streams each offline partition in record batches straight into the online
store, so memory stays flat however many chips there are (Feast's own `materialize` pulls the
whole time range into memory first: feast issues #2594 and #6307). It is incremental: a view
only receives rows newer than what it already has.

The features root (the offline sources) is a local folder or an s3:// prefix; the Feast repo
(feature_store.yaml, file registry, SQLite online store, materialize state) is always a local
folder, `FeatureConfig.repo` (<root>/feast for a local root, ./feast-repo/<bucket>/<prefix> for
an S3 one unless given).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml
from pydantic.dataclasses import dataclass

from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG

PROJECT = "sarflow"


DEFAULT_S3_REPO = "feast-repo"


def default_repo(root: str) -> Path:
    """Where the Feast repo (feature_store.yaml, registry, SQLite online store, materialize state)
    lives when none is given: <root>/feast for a local root; for an s3:// root (Feast's registry and
    online store stay local or in Redis) $SARFLOW_FEAST_REPO when set (the cluster's mounted
    repo, the services mode's repo), else ./feast-repo/<bucket>/<prefix> under the working
    directory, one per root, so repeated commands over the same root share it."""
    if root.startswith("s3://"):
        if os.environ.get("SARFLOW_FEAST_REPO"):
            return Path(os.environ["SARFLOW_FEAST_REPO"]).resolve()
        return Path(DEFAULT_S3_REPO).resolve().joinpath(*[p for p in root[len("s3://"):].split("/") if p])
    return Path(root).resolve() / "feast"


@dataclass(frozen=True, config=STAGE_CONFIG)
class FeatureConfig:
    """params.yaml's `features:` section.
    root: the features root (embeddings/, labels/, bags/), a local folder or an s3:// prefix.
    repo: the local Feast repo folder; default `default_repo(root)` (after construction always a Path).
    online: "sqlite" (a file in repo) or "redis" (at `redis`, host:port).
    batch_rows: rows per streamed batch when materializing."""

    root: str = "data/features"
    online: Literal["sqlite", "redis"] = "sqlite"
    redis: str = "127.0.0.1:6379"
    repo: Path | str | None = None
    batch_rows: int = 8192

    def __post_init__(self):
        # a local root is absolute from here on: Feast resolves a relative source path against
        # its repo folder, not the working directory the user meant
        root = str(self.root)
        object.__setattr__(self, "root", root if root.startswith("s3://") else str(Path(root).resolve()))
        if self.repo is not None and str(self.repo).startswith("s3://"):
            raise InputError(str(self.repo), "the Feast repo (registry, online store, state) must be a local folder")
        object.__setattr__(self, "repo", Path(self.repo).resolve() if self.repo is not None else default_repo(self.root))

    def yaml(self) -> dict:
        online = ({"type": "sqlite", "path": str(self.repo / "online.db")} if self.online == "sqlite"
                  else {"type": "redis", "connection_string": self.redis})
        return {"project": PROJECT, "provider": "local", "registry": str(self.repo / "registry.db"),
                "online_store": online, "offline_store": {"type": "file"}, "entity_key_serialization_version": 3}


def open_feature_store(cfg: FeatureConfig):
    """A FeatureStore over the features root (writes its feature_store.yaml, as `feast serve` reads it)."""
    from feast import FeatureStore

    cfg.repo.mkdir(parents=True, exist_ok=True)
    (cfg.repo / "feature_store.yaml").write_text(yaml.safe_dump(cfg.yaml(), sort_keys=False))
    return FeatureStore(repo_path=str(cfg.repo))


def apply(cfg: FeatureConfig) -> list[str]:
    from sarflow.features.definitions import build

    fs = open_feature_store(cfg)
    objects = build(cfg.root)
    fs.apply(objects)
    return [o.name for o in objects]


def _dataset(view) -> pads.Dataset:
    """The view's offline source as a pyarrow dataset (local, or on S3 through s3fs), streamed from."""
    from sarflow.data.paths import fs_path

    path = view.batch_source.path
    fs, p = fs_path(path)
    try:
        return pads.dataset(p, format="parquet", filesystem=fs)
    except (FileNotFoundError, OSError) as e:
        raise InputError(str(path), f"cannot read the offline source of {view.name} ({type(e).__name__}: {e})") from None


def _check_partition(view, dataset: pads.Dataset) -> None:
    """Refuses, before writing anything, a source without the view's columns, and rows of another
    model version or of another dimension."""
    from sarflow.features.definitions import check_bags_schema

    path = str(view.batch_source.path)
    if view.name == "chip_bags":
        check_bags_schema(path, dataset.schema)
    missing = [c for c in ["chip_id", "event_timestamp", *(f.name for f in view.features)] if c not in dataset.schema.names]
    if missing:
        raise InputError(path, f"the source of view {view.name} lacks column(s) {missing}")
    tags = view.tags
    if "model_version" in tags:
        versions = pc.unique(dataset.to_table(columns=["model_version"]).column("model_version")).to_pylist()
        if versions != [tags["model_version"]]:
            raise InputError(str(view.batch_source.path),
                             f"view {view.name} holds model version {tags['model_version']}, the data has {versions}")
        lengths = pc.unique(pc.list_value_length(dataset.to_table(columns=["embedding"]).column("embedding"))).to_pylist()
        if lengths != [int(tags["dim"])]:
            raise InputError(str(view.batch_source.path),
                             f"view {view.name} takes {tags['dim']}-d embeddings, the data has dimension(s) {lengths}")


def materialize(cfg: FeatureConfig, views: list[str] | None = None, batch_rows: int | None = None) -> dict:
    """Streams new offline rows of every (or the named) view into the online store."""
    fs = open_feature_store(cfg)
    state_path = cfg.repo / "materialized.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    report = {}
    provider = fs._get_provider()
    for view in fs.list_feature_views():
        if views and view.name not in views:
            continue
        dataset = _dataset(view)
        _check_partition(view, dataset)
        since = state.get(view.name)
        flt = pc.field("event_timestamp") > pd.Timestamp(since).to_pydatetime() if since else None
        columns = ["chip_id", "event_timestamp"] + [f.name for f in view.features]
        t0, rows, newest = time.perf_counter(), 0, since
        for batch in dataset.to_batches(columns=columns, filter=flt, batch_size=batch_rows or cfg.batch_rows):
            if batch.num_rows == 0:
                continue
            provider.online_write_batch(fs.config, view, _online_rows(view, batch), progress=None)
            rows += batch.num_rows
            top = pd.Timestamp(pc.max(batch.column("event_timestamp")).as_py()).isoformat()
            newest = top if newest is None or top > newest else newest
        elapsed = time.perf_counter() - t0
        state[view.name] = newest
        report[view.name] = {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": rows / max(elapsed, 1e-9)}
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)
    return report


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _float_list_values(vectors: np.ndarray) -> list:
    """Value(float_list_val=FloatList(val=row)) for every row, parsed from its wire bytes (a packed
    float field is the raw little-endian float32 buffer) instead of copying floats one by one."""
    from feast.protos.feast.types.Value_pb2 import Value

    if vectors.size == 0:
        return [Value.FromString(b"\x82\x01\x00") for _ in range(len(vectors))]
    payload = vectors.shape[1] * 4
    inner = b"\x0a" + _varint(payload)  # FloatList.val (field 1, packed)
    header = b"\x82\x01" + _varint(len(inner) + payload) + inner  # Value.float_list_val (field 16)
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [Value.FromString(header + rows[i].tobytes()) for i in range(len(rows))]


def _online_rows(view, batch) -> list:
    """A record batch as the online store's rows: (entity key, {feature: Value}, event time, created).
    Values are built column by column from Arrow buffers, not row by row through pandas."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    n = batch.num_rows
    columns = {}
    for f in view.features:
        col = batch.column(f.name)
        if f.name == "embedding":
            flat = col.flatten().to_numpy(zero_copy_only=False).astype("<f4", copy=False)
            columns[f.name] = _float_list_values(flat.reshape(n, -1) if n else flat.reshape(0, 0))
        else:
            columns[f.name] = _values(col)
    ids = batch.column("chip_id").to_pylist()
    times = batch.column("event_timestamp").to_pylist()
    names = list(columns)
    return [(EntityKey(join_keys=["chip_id"], entity_values=[Value(string_val=ids[i])]),
             {name: columns[name][i] for name in names}, times[i], None) for i in range(n)]


def _values(col) -> list:
    """Feast Values of an Arrow column: strings, doubles, integers, and lists of those (a null is an empty Value)."""
    import pyarrow as pa
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int64List, StringList, Value

    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        if pa.types.is_string(v) or pa.types.is_large_string(v):
            make = lambda x: Value(string_list_val=StringList(val=x))  # noqa: E731
        elif pa.types.is_float32(v):
            make = lambda x: Value(float_list_val=FloatList(val=x))  # noqa: E731
        elif pa.types.is_floating(v):
            make = lambda x: Value(double_list_val=DoubleList(val=x))  # noqa: E731
        elif pa.types.is_integer(v):
            make = lambda x: Value(int64_list_val=Int64List(val=x))  # noqa: E731
        else:
            raise InputError(str(col.type), f"no online representation for lists of {v}")
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        make = lambda x: Value(string_val=x)  # noqa: E731
    elif pa.types.is_integer(t):
        make = lambda x: Value(int64_val=x)  # noqa: E731
    else:
        make = lambda x: Value(double_val=x)  # noqa: E731
    return [make(x) if x is not None else Value() for x in col.to_pylist()]


def online_features(cfg: FeatureConfig, chip_ids: list[str], features: list[str]) -> pd.DataFrame:
    """Online lookup; an id the online store does not know is an error, not a row of Nones."""
    fs = open_feature_store(cfg)
    df = fs.get_online_features(features=features, entity_rows=[{"chip_id": c} for c in chip_ids]).to_df()
    cols = [c for c in df.columns if c != "chip_id"]
    unknown = df.loc[df[cols].isna().all(axis=1), "chip_id"].tolist()
    if unknown:
        raise InputError(", ".join(unknown[:5]), f"unknown chip id(s) in the online store ({len(unknown)} of {len(chip_ids)})")
    return df


def training_set(cfg: FeatureConfig, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Point-in-time correct join of features onto (chip_id, event_timestamp) rows."""
    fs = open_feature_store(cfg)
    return fs.get_historical_features(entity_df=entity_df, features=features).to_df()


def newest_embeddings_view(cfg: FeatureConfig) -> str:
    from sarflow.features.definitions import view_name
    from sarflow.data.paths import check_root
    from sarflow.features.embed import select_partition

    check_root(cfg.root)
    model, version, _ = select_partition(cfg.root)
    return view_name(model, version)

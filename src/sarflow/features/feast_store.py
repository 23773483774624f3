"""The feature store: Feast configured for the embedded default (SQLite online store) or the
cluster (Redis online store), streaming materialization, online and historical retrieval.

Materialization streams each offline partition in record batches straight into the online
store, so memory stays flat however many chips there are (Feast's own `materialize` pulls the
whole time range into memory first: feast issues #2594 and #6307). It is incremental per source
file: a file only contributes rows newer than what it already gave, and the state is one small
JSON per (view, file) under `FeatureConfig.state`, so materialisation fans out over the parts of a
partition (`materialize(cfg, part=i)`: the i-th file of every view's source; all parts together
equal one full materialisation) with no two tasks writing the same state. The state lives in the
repo for the SQLite online store (a file of that repo too) and, for Redis, under the features root
(`<root>/materialized/redis=<host:port>/<project>/`, on S3 for an s3:// root) where every pod sees it.

The features root (the offline sources) is a local folder or an s3:// prefix; the Feast repo
(feature_store.yaml, SQLite online store) is always a local folder, `FeatureConfig.repo`
(<root>/feast for a local root, ./feast-repo/<bucket>/<prefix> for an S3 one unless given).
The registry is a file in the repo unless `FeatureConfig.registry` (params `features.registry`,
default $SARFLOW_FEAST_REGISTRY) names a SQLAlchemy database URL (Feast's SQL registry, e.g.
`postgresql+psycopg2://user:pass@host:5432/db`, read by every pod and the feature server) or
another Feast registry path (e.g. `s3://bucket/registry.pb`).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import field
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
REGISTRY_ENV = "SARFLOW_FEAST_REGISTRY"  # the Feast registry every pod and the feature server share
REDIS_PASSWORD_ENV = "REDIS_PASSWORD"  # the Redis online store's password (k8s: Secret sarflow-redis)


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
    batch_rows: rows per streamed batch when materializing.
    registry: the Feast registry: None (a file in repo), a SQLAlchemy database URL (Feast's SQL
      registry, e.g. postgresql+psycopg2://...) or a Feast registry path (s3://...); default
      $SARFLOW_FEAST_REGISTRY.
    state: where the incremental materialisation state lives (local folder or s3:// prefix);
      default repo/materialized for SQLite, <root>/materialized/redis=<host:port>/<project> for Redis.
    project: the Feast project (registry entries and online keys are per project)."""

    root: str = "data/features"
    online: Literal["sqlite", "redis"] = "sqlite"
    redis: str = "127.0.0.1:6379"
    repo: Path | str | None = None
    batch_rows: int = 8192
    registry: str | None = field(default_factory=lambda: os.environ.get(REGISTRY_ENV) or None)
    state: str | None = None
    project: str = PROJECT

    def __post_init__(self):
        # a local root is absolute from here on: Feast resolves a relative source path against
        # its repo folder, not the working directory the user meant
        root = str(self.root)
        object.__setattr__(self, "root", root if root.startswith("s3://") else str(Path(root).resolve()))
        if self.repo is not None and str(self.repo).startswith("s3://"):
            raise InputError(str(self.repo), "the Feast repo (registry, online store, state) must be a local folder")
        object.__setattr__(self, "repo", Path(self.repo).resolve() if self.repo is not None else default_repo(self.root))
        if self.state is None:
            from sarflow.data.paths import join

            state = (self.repo / "materialized" if self.online == "sqlite"
                     else join(self.root, "materialized", f"redis={self.redis}", self.project))
            object.__setattr__(self, "state", str(state))
        elif not str(self.state).startswith("s3://"):
            object.__setattr__(self, "state", str(Path(self.state).resolve()))

    @property
    def redis_connection(self) -> str:
        """Feast's Redis connection string: `redis` (host:port), with `password=${REDIS_PASSWORD}`
        when that variable is set (the cluster's Secret `sarflow-redis`): Feast expands it when it
        reads feature_store.yaml, so the password is never written to the file. The state folder
        keeps host:port only."""
        return f"{self.redis},password=${{{REDIS_PASSWORD_ENV}}}" if os.environ.get(REDIS_PASSWORD_ENV) else self.redis

    def yaml(self) -> dict:
        online = ({"type": "sqlite", "path": str(self.repo / "online.db")} if self.online == "sqlite"
                  else {"type": "redis", "connection_string": self.redis_connection})
        return {"project": self.project, "provider": "local", "registry": self.registry_yaml(),
                "online_store": online, "offline_store": {"type": "file"}, "entity_key_serialization_version": 3}

    def registry_yaml(self) -> str | dict:
        """feature_store.yaml's `registry`: the repo's file, a SQL registry for a database URL
        (scheme with `://` other than s3/gs/file: postgresql+psycopg2://, mysql://, sqlite:///),
        else the path as given (Feast's file registry on s3:// or gs://)."""
        reg = self.registry
        if not reg:
            return str(self.repo / "registry.db")
        scheme = reg.split("://", 1)[0] if "://" in reg else ""
        if scheme and scheme not in ("s3", "gs", "file"):
            return {"registry_type": "sql", "path": reg, "cache_ttl_seconds": 60,
                    "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True}}
        return reg


@contextmanager
def feast_errors(cfg: FeatureConfig):
    """Feast's failures a user can fix, as one-line InputErrors: the Redis online store
    unreachable (naming host:port) and a truncated or corrupt registry (naming it and the fix)."""
    from google.protobuf.message import DecodeError

    try:
        import redis.exceptions as redis_errors

        unreachable: tuple = (redis_errors.ConnectionError, redis_errors.TimeoutError)
        refused: tuple = (redis_errors.AuthenticationError, redis_errors.AuthenticationWrongNumberOfArgsError)
    except ImportError:  # redis is the services extra; without it there is no Redis online store
        unreachable = refused = ()
    try:
        yield
    except refused as e:  # (a subclass of ConnectionError: before it)
        given = "the password in $REDIS_PASSWORD" if os.environ.get(REDIS_PASSWORD_ENV) else "no password ($REDIS_PASSWORD unset)"
        raise InputError(cfg.redis, f"the Redis online store refused the login with {given} ({type(e).__name__}: {e}); "
                                    "set REDIS_PASSWORD to its password (k8s: Secret sarflow-redis)") from None
    except unreachable as e:
        raise InputError(cfg.redis, f"the Redis online store is unreachable ({type(e).__name__}: {e}); check that Redis "
                                    "runs there and answers (redis-cli -h HOST -p PORT ping; `sarflow services up` starts "
                                    "one) and that features.redis / --redis names it") from None
    except DecodeError as e:
        if "Registry" not in str(e):  # only the registry's own proto (not, say, an online value)
            raise
        reg = cfg.registry_yaml()
        where = re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", reg["path"] if isinstance(reg, dict) else str(reg))
        raise InputError(where, f"the Feast registry is truncated or corrupt ({e}); delete it and rerun `sarflow features "
                                "materialize` (or `sarflow features apply`), which registers the views again "
                                "(the online store keeps its rows)") from None


def open_feature_store(cfg: FeatureConfig):
    """A FeatureStore over the features root (writes its feature_store.yaml, as `feast serve` reads it)."""
    from feast import FeatureStore

    cfg.repo.mkdir(parents=True, exist_ok=True)
    (cfg.repo / "feature_store.yaml").write_text(yaml.safe_dump(cfg.yaml(), sort_keys=False))
    return FeatureStore(repo_path=str(cfg.repo))


def apply(cfg: FeatureConfig) -> list[str]:
    """Registers the Feast objects of the features root and writes them, as a Feast repo file
    (`features.py`), beside feature_store.yaml: the repo folder is then a Feast project whose
    `feast plan` shows no changes and whose `feast apply` keeps every view. The file is written
    and checked (run, every object equal to the applied one) before anything is registered, and
    replaces the old one only once the registry holds its objects."""
    from sarflow.features.definitions import REPO_FILE, build, check_repo_file, repo_file

    fs = open_feature_store(cfg)
    objects = build(cfg.root)
    target = cfg.repo / REPO_FILE
    tmp = target.with_name(f".{REPO_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(repo_file(objects, _repo_file_header(cfg)))
        check_repo_file(tmp, objects)
        with feast_errors(cfg):
            fs.apply(objects)
            _record_infra(fs, objects)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return [o.name for o in objects]


def _record_infra(fs, objects: list) -> None:
    """Stores in the registry the online-store infrastructure (e.g. one SQLite table per view) of
    these objects, as `feast apply` does after creating it (FeatureStore.apply creates the tables
    but records nothing, so `feast plan` would report them as still to create)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.repo_contents import RepoContents

    views = [o for o in objects if isinstance(o, FeatureView)]
    contents = RepoContents(projects=[], data_sources=[v.batch_source for v in views], feature_views=views,
                            on_demand_feature_views=[], stream_feature_views=[], label_views=[],
                            entities=[o for o in objects if isinstance(o, Entity)],
                            feature_services=[o for o in objects if isinstance(o, FeatureService)], permissions=[])
    fs.registry.update_infra(fs._get_provider().plan_infra(fs.config, contents.to_registry_proto()), fs.project, commit=True)


def _repo_file_header(cfg: FeatureConfig) -> str:
    return (f"Feast definitions of the sarflow features root {cfg.root}, written by `sarflow features apply`\n"
            "(and `sarflow features materialize`) from sarflow.features.definitions.build: the objects it registered,\n"
            "rewritten at every apply (edit that code, not this file). `feast plan` here shows no changes and\n"
            "`feast apply` keeps every view; `feast feature-views list` and `feast ui` read the same registry.")


def _source_files(view) -> list:
    """The Parquet files of the view's offline source, sorted (a partition's part-NNNNN files in shard order)."""
    from sarflow.data.paths import parquet_files

    path = view.batch_source.path
    if str(path).endswith(".parquet"):  # a source that is one file (chip_bags: its folder holds other files too)
        return [path]
    try:
        files = parquet_files(path)
    except OSError as e:
        raise InputError(str(path), f"cannot read the offline source of {view.name} ({type(e).__name__}: {e})") from None
    if not files:
        raise InputError(str(path), f"the offline source of {view.name} has no Parquet file")
    return files


def _dataset(view, file) -> pads.Dataset:
    """One file of the view's offline source as a pyarrow dataset (local, or on S3 through s3fs), streamed from."""
    from sarflow.data.paths import fs_path

    fs, p = fs_path(file)
    try:
        return pads.dataset(p, format="parquet", filesystem=fs)
    except (FileNotFoundError, OSError) as e:
        raise InputError(str(file), f"cannot read the offline source of {view.name} ({type(e).__name__}: {e})") from None


def _check_partition(view, dataset: pads.Dataset, path=None) -> None:
    """Refuses, before writing anything, a source without the view's columns, and rows of another
    model version or of another dimension."""
    from sarflow.features.definitions import check_bags_schema

    path = str(path or view.batch_source.path)
    if view.name == "chip_bags":
        check_bags_schema(path, dataset.schema)
    missing = [c for c in ["chip_id", "event_timestamp", *(f.name for f in view.features)] if c not in dataset.schema.names]
    if missing:
        raise InputError(path, f"the source of view {view.name} lacks column(s) {missing}")
    tags = view.tags
    if "model_version" in tags:
        versions = pc.unique(dataset.to_table(columns=["model_version"]).column("model_version")).to_pylist()
        if versions != [tags["model_version"]]:
            raise InputError(path, f"view {view.name} holds model version {tags['model_version']}, the data has {versions}")
        lengths = pc.unique(pc.list_value_length(dataset.to_table(columns=["embedding"]).column("embedding"))).to_pylist()
        if lengths != [int(tags["dim"])]:
            raise InputError(path, f"view {view.name} takes {tags['dim']}-d embeddings, the data has dimension(s) {lengths}")


def _state_file(cfg: FeatureConfig, view: str, file) -> str:
    from sarflow.data.paths import join

    return str(join(cfg.state, view, str(file).rsplit("/", 1)[-1].removesuffix(".parquet") + ".json"))


def _read_state(path: str) -> str | None:
    """The newest event time a source file already gave the online store (None: nothing yet)."""
    from sarflow.data.paths import filesystem, is_remote

    try:
        text = filesystem().cat_file(path[len("s3://"):]) if is_remote(path) else Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(text)["newest"]


def _write_state(path: str, newest: str | None) -> None:
    """One small JSON, replaced whole (an S3 put is atomic; locally a temp file renamed)."""
    from sarflow.data.paths import filesystem, is_remote

    data = json.dumps({"newest": newest}).encode()
    if is_remote(path):
        filesystem().pipe_file(path[len("s3://"):], data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def materialize(cfg: FeatureConfig, views: list[str] | None = None, batch_rows: int | None = None,
                part: int | None = None) -> dict:
    """Streams new offline rows of every (or the named) view into the online store; with `part`,
    only the part-th file of each view's source (a view with fewer files has nothing to do), so
    tasks 0..P-1 together do what one full materialisation does. Per view: rows written, the
    source's file count (`parts`) and the files done."""
    with feast_errors(cfg):
        return _materialize(cfg, views, batch_rows, part)


def _materialize(cfg: FeatureConfig, views: list[str] | None, batch_rows: int | None, part: int | None) -> dict:
    fs = open_feature_store(cfg)
    if part is not None and part < 0:
        raise InputError(str(part), "the part to materialize is a file index >= 0")
    report = {}
    provider = fs._get_provider()
    for view in fs.list_feature_views():
        if views and view.name not in views:
            continue
        files = _source_files(view)
        chosen = files if part is None else files[part:part + 1]
        datasets = [(f, _dataset(view, f)) for f in chosen]
        for f, dataset in datasets:  # every chosen file checked before anything is written
            _check_partition(view, dataset, f)
        columns = ["chip_id", "event_timestamp"] + [f.name for f in view.features]
        t0, rows = time.perf_counter(), 0
        for f, dataset in datasets:
            state = _state_file(cfg, view.name, f)
            since = newest = _read_state(state)
            flt = pc.field("event_timestamp") > pd.Timestamp(since).to_pydatetime() if since else None
            for batch in dataset.to_batches(columns=columns, filter=flt, batch_size=batch_rows or cfg.batch_rows):
                if batch.num_rows == 0:
                    continue
                provider.online_write_batch(fs.config, view, _online_rows(view, batch), progress=None)
                rows += batch.num_rows
                top = pd.Timestamp(pc.max(batch.column("event_timestamp")).as_py()).isoformat()
                newest = top if newest is None or top > newest else newest
            if newest != since:
                _write_state(state, newest)
        elapsed = time.perf_counter() - t0
        report[view.name] = {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": rows / max(elapsed, 1e-9),
                             "parts": len(files), "files": [str(f).rsplit("/", 1)[-1] for f in chosen]}
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
    with feast_errors(cfg):
        df = fs.get_online_features(features=features, entity_rows=[{"chip_id": c} for c in chip_ids]).to_df()
    cols = [c for c in df.columns if c != "chip_id"]
    unknown = df.loc[df[cols].isna().all(axis=1), "chip_id"].tolist()
    if unknown:
        raise InputError(", ".join(unknown[:5]), f"unknown chip id(s) in the online store ({len(unknown)} of {len(chip_ids)})")
    return df


def training_set(cfg: FeatureConfig, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Point-in-time correct join of features onto (chip_id, event_timestamp) rows."""
    fs = open_feature_store(cfg)
    with feast_errors(cfg):
        return fs.get_historical_features(entity_df=entity_df, features=features).to_df()


def newest_embeddings_view(cfg: FeatureConfig) -> str:
    from sarflow.features.definitions import view_name
    from sarflow.data.paths import check_root
    from sarflow.features.embed import select_partition

    check_root(cfg.root)
    model, version, _ = select_partition(cfg.root)
    return view_name(model, version)

"""Feast objects for sarflow: the `chip` entity, one `chip_embeddings_*` view per model version
found under the features root, `chip_labels`, `chip_bags`, and the feature services.

`feature_repo/definitions.py` exposes these to `feast apply`; `sarflow features` applies them
through the Python SDK and writes them, as plain Feast code (`repo_file`), into the features
root's Feast repo (`features.py` beside feature_store.yaml and the registry), so `feast apply` or
`feast plan` run there by a user keeps every view instead of deleting them. Sources are Parquet files under the features root: a local folder (the
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


REPO_FILE = "features.py"  # the Feast repo file `sarflow features apply` writes beside feature_store.yaml


def _kwargs(pairs: list[tuple[str, object, object]]) -> list[str]:
    """`name=value` for every (name, value, default) whose value is not the default (values as Python literals)."""
    return [f"{k}={v if isinstance(v, _Code) else repr(v)}" for k, v, default in pairs if v != default]


class _Code(str):
    """Python source, written as is (not as a string literal)."""


def _ident(name: str, taken: set) -> str:
    ident = re.sub(r"\W+", "_", name).strip("_") or "obj"
    ident = "_" + ident if ident[0].isdigit() else ident
    while ident in taken:
        ident += "_"
    taken.add(ident)
    return ident


def _call(func: str, args: list[str]) -> str:
    return f"{func}(\n    " + ",\n    ".join(args) + ",\n)" if args else f"{func}()"


def _ttl(ttl: timedelta | None) -> _Code | None:
    if ttl is None:
        return None
    seconds = int(ttl.total_seconds())
    if ttl != timedelta(seconds=seconds):
        return _Code(f"timedelta(microseconds={ttl // timedelta(microseconds=1)})")
    return _Code(f"timedelta(days={seconds // 86400})" if seconds % 86400 == 0 else f"timedelta(seconds={seconds})")


def _field(f: Field, types: set) -> str:
    dtype = str(f.dtype)
    types.update(re.findall(r"\w+", dtype))
    args = [f"name={f.name!r}", f"dtype={dtype}"] + _kwargs([
        ("description", f.description, ""), ("tags", f.tags, {}), ("vector_index", f.vector_index, False),
        ("vector_length", f.vector_length, 0), ("vector_search_metric", f.vector_search_metric, None)])
    return f"Field({', '.join(args)})"


def repo_file(objects: list, header: str = "") -> str:
    """The Feast objects (an Entity, FeatureViews over FileSources, FeatureServices: what `build`
    returns) as a Feast repo file: plain Feast code a user reads and `feast apply` runs, equal
    object for object to what was applied (`check_repo_file` proves it). Anything this writer does
    not know how to spell is refused rather than written half right."""
    taken: set = set()
    types: set = set()
    names: dict[tuple[str, str], str] = {}
    blocks: list[str] = []
    for o in objects:
        if isinstance(o, Entity):
            ident = names["entity", o.name] = _ident(o.name, taken)
            args = [f"name={o.name!r}", f"join_keys=[{o.join_key!r}]"] + _kwargs([
                ("value_type", _Code(f"ValueType.{o.value_type.name}"), None), ("description", o.description, ""),
                ("tags", o.tags, {}), ("owner", o.owner, "")])
            blocks.append(f"{ident} = {_call('Entity', args)}")
    for o in objects:
        if not isinstance(o, FeatureView):
            continue
        src = o.batch_source
        if type(src) is not FileSource or o.stream_source is not None:
            raise InputError(o.name, f"the Feast repo file only spells FileSources, not {type(src).__name__}")
        if src.file_format is not None and type(src.file_format).__name__ != "ParquetFormat":
            raise InputError(src.path, f"the Feast repo file only spells Parquet sources, not {src.file_format}")
        src_ident = names["source", src.name] = _ident(src.name, taken)
        args = [f"name={src.name!r}", f"path={src.path!r}"] + _kwargs([
            ("timestamp_field", src.timestamp_field, ""), ("created_timestamp_column", src.created_timestamp_column, ""),
            ("field_mapping", src.field_mapping, {}), ("s3_endpoint_override", src.s3_endpoint_override or "", ""),
            ("description", src.description, ""), ("tags", src.tags, {}), ("owner", src.owner, "")])
        blocks.append(f"{src_ident} = {_call('FileSource', args)}")
        ident = names["view", o.name] = _ident(o.name, taken)
        missing = [e for e in o.entities if ("entity", e) not in names]
        if missing:
            raise InputError(o.name, f"the view's entities {missing} are not among the objects written")
        schema = "[\n        " + ",\n        ".join(_field(f, types) for f in o.features) + ",\n    ]"
        args = [f"name={o.name!r}", f"entities=[{', '.join(names['entity', e] for e in o.entities)}]"] + _kwargs([
            ("ttl", _ttl(o.ttl), None), ("online", o.online, None), ("offline", o.offline, False),
            ("source", _Code(src_ident), None), ("schema", _Code(schema), None), ("description", o.description, ""),
            ("tags", o.tags, {}), ("owner", o.owner, ""), ("enabled", o.enabled, True)])
        blocks.append(f"{ident} = {_call('FeatureView', args)}")
    for o in objects:
        if not isinstance(o, FeatureService):
            continue
        refs = []
        for p in o.feature_view_projections:
            if ("view", p.name) not in names or p.name_alias or p.join_key_map:
                raise InputError(o.name, f"the feature service's projection of {p.name} cannot be spelled from the objects written")
            view = next(v for v in objects if isinstance(v, FeatureView) and v.name == p.name)
            chosen = [f.name for f in p.features]
            refs.append(names["view", p.name] + ("" if chosen == [f.name for f in view.features] else f"[{chosen!r}]"))
        args = [f"name={o.name!r}", f"features=[{', '.join(refs)}]"] + _kwargs([
            ("description", o.description, ""), ("tags", o.tags, {}), ("owner", o.owner, "")])
        blocks.append(f"{_ident(o.name, taken)} = {_call('FeatureService', args)}")
    known = (Entity, FeatureView, FeatureService)
    other = [o.name for o in objects if not isinstance(o, known)]
    if other:
        raise InputError(", ".join(other), "the Feast repo file cannot spell these objects")
    imports = ["from datetime import timedelta", "", "from feast import Entity, FeatureService, FeatureView, Field, FileSource",
               *([f"from feast.types import {', '.join(sorted(types))}"] if types else []),
               "from feast.value_type import ValueType"]
    comment = "".join(f"# {line}".rstrip() + "\n" for line in (header or "Feast definitions.").splitlines())
    return comment + "\n" + "\n".join(imports) + "\n\n\n" + "\n\n".join(blocks) + "\n"


def _strip_meta(msg) -> None:
    """Clears every `meta` (creation and update times) in a Feast proto, however deep."""
    for fd, value in msg.ListFields():
        if fd.name == "meta":
            msg.ClearField("meta")
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for item in (value if fd.is_repeated else [value]):
                _strip_meta(item)


def _spec(o) -> bytes:
    """An object's Feast spec, without times (what `feast plan` compares)."""
    proto = o.to_proto()
    spec = proto.spec if hasattr(proto, "spec") else proto
    _strip_meta(spec)
    return spec.SerializeToString(deterministic=True)


def check_repo_file(path: str | Path, objects: list) -> None:
    """Runs the repo file as `feast apply` would and refuses it unless it defines exactly these
    objects, each equal (its Feast spec) to the one given."""
    import runpy

    found = {}
    for value in runpy.run_path(str(path)).values():
        if isinstance(value, (Entity, FeatureView, FeatureService)):
            found[type(value).__name__, value.name] = value
    want = {(type(o).__name__, o.name): o for o in objects}
    if set(found) != set(want):
        raise InputError(str(path), f"defines {sorted(found)}, not the applied {sorted(want)}")
    differ = [key[1] for key in want if _spec(found[key]) != _spec(want[key])]
    if differ:
        raise InputError(str(path), f"its {differ} differ from the applied objects")

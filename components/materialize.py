"""Component `materialize-features`: register the Feast objects, stream the new offline rows
into the online store and build the similarity index of the newest embeddings; and its fan-out
over the parts of the published partition: `plan-materialize` (Feast apply, once) ->
`materialize-part` per part -> `materialize-features` with the parts' reports (the index).

Thin wrapper over :mod:`sarflow.features.feast_store` (``apply``, ``materialize``) and
:func:`sarflow.features.search.build_index`. ``online`` is ``sqlite`` (embedded default) or
``redis`` (the cluster, ``redis`` = host:port).

Parts are safe to run at once: the incremental state is one JSON per (view, source file)
(``FeatureConfig.state``: for Redis under the features root, on S3 for an s3:// root, where every
pod sees it), and part ``i`` reads and records only the ``i``-th file of each view's source, so no
two parts write the same state. Part ``i`` takes the ``i``-th file of *every* view (labels, bags,
older partitions too), so the plan fans out over as many parts as the longest source has files,
not only the new partition's. The Feast repo is a local folder (a pod's own on a cluster, where the
parts write Redis side by side); the parts of a local run share it and its SQLite online store,
one file, so there they take turns under a lock in the repo.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def materialize_features(
    embeddings: Input[Dataset],
    features: Output[Artifact],
    metrics: Output[Metrics],
    features_root: str,
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
    parts: List[str] = [],
):
    """Feast apply + incremental streaming materialization + similarity index; with `parts` (the
    Collected reports of `materialize-part` tasks) the parts did the materialization: their
    reports are summed per view instead."""
    import json
    from pathlib import Path

    from components.paths import absolute
    from sarflow.features.search import build_index
    from sarflow.features.feast_store import FeatureConfig, apply, materialize

    features_root = absolute(features_root)  # recorded below: the task's working directory resolved here
    described = json.loads(Path(embeddings.path).read_text())
    cfg = FeatureConfig(root=features_root, online=online, redis=redis)
    objects = apply(cfg)  # idempotent: after a fan-out, the objects the plan applied
    if parts:
        report = {}
        for done in (json.loads(p) for p in parts):
            for view, r in done.items():
                merged = report.setdefault(view, {"rows": 0, "seconds": 0.0, "parts": r["parts"], "files": []})
                merged["rows"] += int(r["rows"])
                merged["seconds"] = max(merged["seconds"], float(r["seconds"]))  # the parts ran side by side
                merged["files"] += r["files"]
        for r in report.values():
            r["rows_per_s"] = r["rows"] / max(r["seconds"], 1e-9)
            r["files"] = sorted(r["files"])
    else:
        report = materialize(cfg)
    index = build_index(features_root, described["model"], str(described["version"]))
    record = {"features_root": features_root, "feast_repo": str(cfg.repo), "objects": objects,
              "materialized": report, "index": index.info()}
    Path(features.path).parent.mkdir(parents=True, exist_ok=True)
    Path(features.path).write_text(json.dumps(record, indent=1, default=str))
    features.metadata.update({"feast_repo": str(cfg.repo), "views": [o for o in objects if o.startswith("chip_")]})
    metrics.log_metric("rows_materialized", sum(int(v["rows"]) for v in report.values()))
    metrics.log_metric("index_size", len(index))
    if parts:
        metrics.log_metric("parts", len(parts))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def plan_materialize(
    embeddings: Input[Dataset],
    features_root: str,
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
) -> List[int]:
    """Feast apply (once, before the parts), then the part numbers: 0 .. the most files any view's
    offline source has - 1 (at least the published partition's parts): the ParallelFor's items."""
    import json
    from pathlib import Path

    from components.paths import absolute
    from sarflow.features.feast_store import FeatureConfig, _source_files, apply, open_feature_store

    cfg = FeatureConfig(root=absolute(features_root), online=online, redis=redis)
    apply(cfg)
    described = json.loads(Path(embeddings.path).read_text())
    n = max([len(described.get("files") or [0])] +
            [len(_source_files(view)) for view in open_feature_store(cfg).list_feature_views()])
    print(f"materialization fans out over {n} part(s)")
    return list(range(n))


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def materialize_part(
    part: int,
    features_root: str,
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
) -> str:
    """Streams the new rows of the `part`-th file of every view's source into the online store
    (incremental, its own state files); returns the per-view report as JSON. No apply: the plan did."""
    import fcntl
    import json

    from components.paths import absolute
    from sarflow.features.feast_store import FeatureConfig, materialize

    cfg = FeatureConfig(root=absolute(features_root), online=online, redis=redis)
    # the repo is a local folder: a pod's own on a cluster, shared by the parts of a local run, whose
    # feature_store.yaml each rewrites and whose SQLite online store is one file: they take turns there
    cfg.repo.mkdir(parents=True, exist_ok=True)
    with open(cfg.repo / ".materialize.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = materialize(cfg, part=part)
    return json.dumps(report, default=str)

"""Component `materialize-features`: register the Feast objects, stream the new offline rows
into the online store and build the similarity index of the newest embeddings.

Thin wrapper over :mod:`sarflow.features.feast_store` (``apply``, ``materialize``) and
:func:`sarflow.features.search.build_index`. ``online`` is ``sqlite`` (embedded default) or
``redis`` (the cluster, ``redis`` = host:port).
"""

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
):
    """Feast apply + incremental streaming materialization + similarity index."""
    import json
    from pathlib import Path

    from components.paths import absolute
    from sarflow.features.search import build_index
    from sarflow.features.feast_store import FeatureConfig, apply, materialize

    features_root = absolute(features_root)  # recorded below: the task's working directory resolved here
    described = json.loads(Path(embeddings.path).read_text())
    cfg = FeatureConfig(root=features_root, online=online, redis=redis)
    objects = apply(cfg)
    report = materialize(cfg)
    index = build_index(features_root, described["model"], str(described["version"]))
    record = {"features_root": features_root, "feast_repo": str(cfg.repo), "objects": objects,
              "materialized": report, "index": index.info()}
    Path(features.path).parent.mkdir(parents=True, exist_ok=True)
    Path(features.path).write_text(json.dumps(record, indent=1, default=str))
    features.metadata.update({"feast_repo": str(cfg.repo), "views": [o for o in objects if o.startswith("chip_")]})
    metrics.log_metric("rows_materialized", sum(int(v["rows"]) for v in report.values()))
    metrics.log_metric("index_size", len(index))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__

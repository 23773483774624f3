"""Component `version-chips`: version a chip store with DVC and push it to the remote.

Thin wrapper over :func:`sarflow.data.versioning.version_store`. The dataset version (DVC md5 of
the store, git commit, catalog hash) is written as a JSON ``dsl.Artifact`` (also in its
metadata) and returned as output parameters for downstream pipelines.

The DVC repository defaults to the store's own folder (not an enclosing one): each store of
a ParallelFor fan-out then has its own repository, so concurrent ``dvc add`` never fight over
one repository lock. On a cluster that folder is the pod's local copy of the input artifact,
so give a ``remote`` (``s3://...`` on MinIO): the pushed cache is what outlives the pod.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def version_chips(
    store: Input[Dataset],
    version: Output[Artifact],
    metrics: Output[Metrics],
    remote: str = "",
    repo: str = "",
    push: bool = True,
    s3_endpoint: str = "",
) -> NamedTuple("DatasetVersion", [("dvc_md5", str), ("git_commit", str), ("catalog_hash", str)]):
    """`dvc add` (+ `dvc push` when a remote is given) the store; returns the dataset version."""
    import json
    import os
    from collections import namedtuple
    from pathlib import Path

    if s3_endpoint:  # credentials come from the environment (the sarflow-minio secret)
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from components.paths import absolute
    from sarflow.data.versioning import version_store

    # a local remote made absolute here: `dvc remote add` (run in the repository) would resolve it there
    remote, repo = absolute(remote), absolute(repo)
    path = Path(store.path)
    v = version_store(path, remote=remote or None, repo=repo or path.parent, push=push)
    Path(version.path).parent.mkdir(parents=True, exist_ok=True)
    Path(version.path).write_text(json.dumps(v, indent=1, sort_keys=True))
    version.metadata.update({k: ("" if val is None else val) for k, val in v.items()})
    metrics.log_metric("chips", v["chips"])
    metrics.log_metric("pushed", int(bool(v["pushed"])))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
    out = namedtuple("DatasetVersion", ["dvc_md5", "git_commit", "catalog_hash"])
    return out(v["dvc_md5"], v["git_commit"] or "", v["catalog_hash"])

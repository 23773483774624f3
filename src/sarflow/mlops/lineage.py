"""The lineage every MLflow run and registered model carries (DESIGN.md): the dataset version
(DVC hash of the store + the data repository's git commit), the catalog hash and the code
version (sarflow version + the code's git commit).

On a cluster a pod has neither the data repository nor the code's git history, so lineage
travels by value: the pipeline passes the version task's outputs (``dvc_md5``, ``git_commit``)
to every task that makes a run, which hands them to the library (:func:`given_lineage`, the
``SARFLOW_DATASET_*`` variables; a TrainJob sets the same variables), and the image carries its
code commit (``SARFLOW_CODE_COMMIT``, a build argument of docker/Dockerfile*). Only when no value
was given is the lineage discovered from the store's DVC repository and the code's git checkout.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from sarflow import __version__

LINEAGE_PREFIX = "sarflow."
# the values given by the task that made them (environment of a pipeline task, a TrainJob's pods)
DATASET_VERSION_ENV = "SARFLOW_DATASET_VERSION"  # the store's DVC md5 (the version task's dvc_md5)
DATASET_COMMIT_ENV = "SARFLOW_DATASET_GIT_COMMIT"  # the data repository's commit (its git_commit)
CODE_COMMIT_ENV = "SARFLOW_CODE_COMMIT"  # set in the image at build time (docker build --build-arg GIT_COMMIT=...)


def code_commit() -> str:
    """The code's git commit: the image's ``SARFLOW_CODE_COMMIT``, else the checkout's HEAD,
    else "unknown"."""
    given = os.environ.get(CODE_COMMIT_ENV, "").strip()
    if given:
        return given
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    except OSError:  # no git in the image
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


@contextmanager
def given_lineage(dataset_version: str = "", dataset_git_commit: str = ""):
    """The dataset version and data commit a pipeline task received from the version task, made
    what :func:`dataset_lineage` reports inside the block (empty values: not given)."""
    from sarflow.params import environ

    env = {k: v for k, v in ((DATASET_VERSION_ENV, dataset_version), (DATASET_COMMIT_ENV, dataset_git_commit)) if v}
    with environ(env):
        yield


def dataset_lineage(store: str, dataset_version: str | None = None,
                    dataset_git_commit: str | None = None) -> dict[str, str]:
    """Lineage of a chip store as flat string tags. The dataset version and data commit are the
    values given (arguments, else :func:`given_lineage`'s variables); only when none is given are
    they looked up in the DVC repository around a local store ("untracked"/"none" without one)."""
    from sarflow.data.chipstore import open_chip_group

    group = open_chip_group(store)
    dataset_version = dataset_version or os.environ.get(DATASET_VERSION_ENV, "").strip() or None
    dataset_git_commit = dataset_git_commit or os.environ.get(DATASET_COMMIT_ENV, "").strip() or None
    tags = {
        "catalog_hash": str(group.attrs.get("catalog_hash")),
        "store": store,
        "code_version": __version__,
        "code_commit": code_commit(),
        "dataset_dvc_md5": dataset_version or "untracked",
        "dataset_git_commit": dataset_git_commit or "none",
    }
    if dataset_version is None and store.startswith("s3://"):  # the manifest beside it (versioning.s3_version_manifest)
        from sarflow.data.versioning import s3_store_version

        tags["dataset_dvc_md5"] = s3_store_version(store) or "untracked"
    elif dataset_version is None:
        from sarflow.errors import SarflowError
        from sarflow.data.versioning import find_repo, git_commit, store_hash

        path = Path(store).resolve()
        repo = find_repo(path.parent)
        if repo is not None:
            try:
                tags["dataset_dvc_md5"] = store_hash(repo, path)
            except SarflowError:
                pass
            tags["dataset_git_commit"] = dataset_git_commit or git_commit(repo) or "none"
    return {LINEAGE_PREFIX + k: v for k, v in tags.items()}

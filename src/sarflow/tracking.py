"""MLflow conventions: where runs go, and the lineage every run and registered model carries.

Lineage (DESIGN.md): the dataset version (DVC hash of the store + the data repository's git
commit), the catalog hash and the code version (sarflow version + the code's git commit).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sarflow import __version__

LINEAGE_PREFIX = "sarflow."


def code_commit() -> str:
    here = Path(__file__).resolve().parent
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def dataset_lineage(store: str) -> dict[str, str]:
    """Lineage of a chip store as flat string tags."""
    from sarflow.training.data import open_chip_group

    group = open_chip_group(store)
    tags = {
        "catalog_hash": str(group.attrs.get("catalog_hash")),
        "store": store,
        "code_version": __version__,
        "code_commit": code_commit(),
        "dataset_dvc_md5": "untracked",
        "dataset_git_commit": "none",
    }
    if not store.startswith("s3://"):
        from sarflow.errors import SarflowError
        from sarflow.versioning import find_repo, git_commit, store_hash

        path = Path(store).resolve()
        repo = find_repo(path.parent)
        if repo is not None:
            try:
                tags["dataset_dvc_md5"] = store_hash(repo, path)
            except SarflowError:
                pass
            tags["dataset_git_commit"] = git_commit(repo) or "none"
    return {LINEAGE_PREFIX + k: v for k, v in tags.items()}


def setup_mlflow(tracking_uri: str, experiment: str) -> str:
    """Points MLflow at the tracking URI and returns the experiment id. With a sqlite:/// backend
    the artifacts go in `mlartifacts/` beside the database (the embedded default)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested result dict as flat metric names (`a_b_c`), e.g. for
    KFP Metrics artifacts and MLflow; strings, lists and non-finite values are left out."""
    import math

    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def model_requirements() -> list[str]:
    """The pip requirements logged with every sarflow model: pinned to what is installed here.
    Given explicitly, MLflow skips inferring them (which re-imports the model in a subprocess
    and takes ~15 s per model)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "numpy", "scikit-learn", "sarflow"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out

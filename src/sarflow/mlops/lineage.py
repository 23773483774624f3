"""The lineage every MLflow run and registered model carries (DESIGN.md): the dataset version
(DVC hash of the store + the data repository's git commit), the catalog hash and the code
version (sarflow version + the code's git commit)."""

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
    from sarflow.data.chipstore import open_chip_group

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
        from sarflow.data.versioning import find_repo, git_commit, store_hash

        path = Path(store).resolve()
        repo = find_repo(path.parent)
        if repo is not None:
            try:
                tags["dataset_dvc_md5"] = store_hash(repo, path)
            except SarflowError:
                pass
            tags["dataset_git_commit"] = git_commit(repo) or "none"
    return {LINEAGE_PREFIX + k: v for k, v in tags.items()}

"""Similarity search over a model version's embeddings, kept beside the feature store.

The index is built from the same offline partition that was materialized, saved under
`<root>/index/model=<name>/version=<version>/` (for an s3:// root: under the local Feast repo,
`<repo>/index/...`, as faiss reads and writes local files), and refuses to load for another
model version.
"""

from __future__ import annotations

from pathlib import Path

from sarflow.data.paths import check_root, is_remote
from sarflow.features.embed import embedding_matrix, read_partition, select_partition
from sarflow.features.similarity import SimilarityIndex


def _pick(root: str | Path, model: str | None, version: str | None) -> tuple[str, str, str | Path]:
    check_root(root)
    return select_partition(root, model, version)


def index_dir(root: str | Path, model: str, version: str, repo: str | Path | None = None) -> Path:
    if is_remote(root):
        from sarflow.features.feast_store import default_repo

        base = Path(repo) if repo is not None else default_repo(str(root))
    else:
        base = Path(root)
    return base / "index" / f"model={model}" / f"version={version}"


def build_index(root: str | Path, model: str | None = None, version: str | None = None,
                repo: str | Path | None = None, **kwargs) -> SimilarityIndex:
    model, version, path = _pick(root, model, version)
    table = read_partition(path)
    meta = table.select(["chip_id", "lon", "lat", "split"]).to_pandas().set_index("chip_id")
    index = SimilarityIndex(table.column("chip_id").to_pylist(), embedding_matrix(table), meta,
                            model_name=model, model_version=version, **kwargs)
    index.save(index_dir(root, model, version, repo))
    return index


def load_index(root: str | Path, model: str | None = None, version: str | None = None,
               repo: str | Path | None = None) -> SimilarityIndex:
    model, version, _ = _pick(root, model, version)
    d = index_dir(root, model, version, repo)
    if not (d / "meta.json").is_file():
        return build_index(root, model, version, repo)
    return SimilarityIndex.load(d, model_name=model, model_version=version)


def similar(root: str | Path, chip_id: str, k: int = 10, model: str | None = None,
            version: str | None = None, repo: str | Path | None = None) -> list[dict]:
    return load_index(root, model, version, repo).similar(chip_id, k)

"""Fan-out over embedding parts (issue 14, item 3): `embed_store(shards=(a, b))` parts published
by `finalize_embeddings` equal one full run row for row (locally and on a moto S3 server);
Feast materialisation of part i, two parts equal to one full materialisation (SQLite and Redis
online stores); a Feast SQL registry on PostgreSQL written by one process and read by another."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import tiny_features
from sarflow.errors import InputError
from sarflow.features.embed import embed_store, finalize_embeddings, read_embeddings, staging

MODEL = "sarflow-encoder-mae"
VIEW = "chip_embeddings_mae_v1"
COLUMNS = ["chip_id", "model_name", "model_version", "dataset_version", "lon", "lat", "split", "geometry"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
          "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@pytest.fixture(scope="module")
def full(tiny_store, tmp_path_factory):
    """The tiny store, a registered tiny MAE and one full embedding run (the reference)."""
    return tiny_features(tiny_store, tmp_path_factory.mktemp("parts"), MODEL)


def _same_rows(a, b) -> None:
    a, b = a.to_pandas(), b.to_pandas()
    assert len(a) == len(b) and a.chip_id.is_unique
    for c in COLUMNS:
        assert a[c].tolist() == b[c].tolist(), c
    np.testing.assert_allclose(np.stack(a.embedding.to_numpy()), np.stack(b.embedding.to_numpy()), rtol=1e-5, atol=1e-6)


def _embed_in_parts(full, root, ranges) -> list[dict]:
    return [embed_store(str(full["store"]), f"models:/{MODEL}/1", root, batch_size=7, shards=r, workers=2)
            for r in ranges]


def test_two_shard_ranges_equal_one_full_run_row_for_row(full, tmp_path):
    n_shards = -(-full["embed"]["rows"] // 16)  # the tiny store has 16 chips per shard
    assert n_shards >= 3
    root = tmp_path / "features"
    parts = _embed_in_parts(full, root, [(2, n_shards), (0, 2)])  # any order
    assert [p["shards"] for p in parts] == [[2, n_shards], [0, 2]]
    assert sum(p["rows"] for p in parts) == full["embed"]["rows"]
    assert not (root / "embeddings" / f"model={MODEL}").exists()  # nothing published before finalize
    done = finalize_embeddings(root, MODEL, "1")
    assert done["files"] == ["part-00000.parquet", "part-00001.parquet"] and done["rows"] == full["embed"]["rows"]
    assert not staging(root, name=MODEL, version="1").exists()
    _same_rows(read_embeddings(root, MODEL, "1"), read_embeddings(full["root"], MODEL, "1"))
    first = pq.read_table(root / "embeddings" / f"model={MODEL}" / "version=1" / "part-00000.parquet")
    assert json.loads(first.schema.metadata[b"sarflow.part"])["shards"] == [0, 2]
    assert json.loads(first.schema.metadata[b"geo"])["primary_column"] == "geometry"  # still GeoParquet
    with pytest.raises(InputError, match="already exist"):
        finalize_embeddings(root, MODEL, "1")


def test_a_gap_an_overlap_or_another_version_is_refused_and_nothing_is_published(full, tmp_path):
    n_shards = -(-full["embed"]["rows"] // 16)
    root = tmp_path / "features"
    _embed_in_parts(full, root, [(0, 1), (2, n_shards)])
    with pytest.raises(InputError, match=r"shards 1:2 of .* have no part"):
        finalize_embeddings(root, MODEL, "1")
    _embed_in_parts(full, root, [(1, 3)])
    with pytest.raises(InputError, match="overlap"):
        finalize_embeddings(root, MODEL, "1")
    assert not (root / "embeddings" / f"model={MODEL}").exists()
    (staging(root, name=MODEL, version="1") / f"part-000002-{n_shards:06d}.parquet").unlink()
    (staging(root, name=MODEL, version="1") / "part-000001-000003.parquet").unlink()
    _embed_in_parts(full, root, [(1, n_shards)])
    part = staging(root, name=MODEL, version="1") / "part-000000-000001.parquet"
    t = pq.read_table(part)
    meta = json.loads(t.schema.metadata[b"sarflow.part"])
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata,
                                              b"sarflow.part": json.dumps({**meta, "dataset_version": "x"}).encode()}), part)
    with pytest.raises(InputError, match="dataset_version"):
        finalize_embeddings(root, MODEL, "1")
    with pytest.raises(InputError, match="not within the store's"):
        _embed_in_parts(full, root, [(0, n_shards + 1)])
    with pytest.raises(InputError, match="no staged parts"):
        finalize_embeddings(tmp_path / "empty", MODEL, "1")


@pytest.mark.integration
def test_parts_on_s3_equal_one_full_run(full, moto_url, monkeypatch):
    from sarflow.data.storage import ensure_bucket, s3_filesystem
    from sarflow.features.embed import embedding_partitions

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    bucket = f"sarflow-{uuid.uuid4().hex[:12]}"
    ensure_bucket(bucket)
    root = f"s3://{bucket}/features"
    n_shards = -(-full["embed"]["rows"] // 16)
    _embed_in_parts(full, root, [(0, 1), (1, n_shards)])
    assert embedding_partitions(root) == []  # staged parts are not a partition
    done = finalize_embeddings(root, MODEL, "1")
    assert done["files"] == ["part-00000.parquet", "part-00001.parquet"]
    fs = s3_filesystem()
    keys = fs.find(f"{bucket}/features")
    assert not [k for k in keys if ".staging" in k or "_publishing" in k or ".partial-" in k]
    assert [p[:2] for p in embedding_partitions(root)] == [(MODEL, "1")]
    _same_rows(read_embeddings(root, MODEL, "1"), read_embeddings(full["root"], MODEL, "1"))


def test_cli_shards_and_finalize(full, tmp_path):
    exe = shutil.which("sarflow", path=str(__import__("pathlib").Path(sys.executable).parent))
    root = tmp_path / "features"
    n_shards = -(-full["embed"]["rows"] // 16)
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": full["uri"]}
    base = [exe, "embed", str(full["store"]), "--model", f"models:/{MODEL}/1", "--root", str(root), "--batch-size", "16"]
    for rng in ("0:2", f"2:{n_shards}"):
        out = subprocess.run(base + ["--shards", rng], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
    bad = subprocess.run(base + ["--shards", "2-3"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "A:B" in bad.stderr
    out = subprocess.run(base + ["--finalize"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == ["part-00000.parquet", "part-00001.parquet"]
    _same_rows(read_embeddings(root, MODEL, "1"), read_embeddings(full["root"], MODEL, "1"))

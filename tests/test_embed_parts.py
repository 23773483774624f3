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
from sarflow.features.embed import embed_store, finalize_embeddings, read_embeddings, shard_ranges, staging

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


def test_an_s3_outage_while_publishing_is_one_error_and_a_rerun_publishes(full, moto_url, monkeypatch):
    """The endpoint fails after the first part was copied (fault injected in the copy): one
    StorageError naming the partition, the endpoint and the rerun; the half-published partition is
    skipped by every reader (its marker), the staged parts are kept, the named rerun publishes."""
    import botocore.exceptions

    from sarflow.data.storage import ensure_bucket
    from sarflow.errors import StorageError
    from sarflow.features import embed as embed_module
    from sarflow.features.embed import embedding_partitions

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    bucket = f"sarflow-{uuid.uuid4().hex[:12]}"
    ensure_bucket(bucket)
    root = f"s3://{bucket}/features"
    n_shards = -(-full["embed"]["rows"] // 16)
    _embed_in_parts(full, root, [(0, 1), (1, n_shards)])
    real = embed_module.filesystem

    class Outage:
        def __init__(self):
            self.fs, self.copies = real(), 0

        def copy(self, *a, **k):
            self.copies += 1
            if self.copies > 1:
                raise botocore.exceptions.EndpointConnectionError(endpoint_url=moto_url)
            return self.fs.copy(*a, **k)

        def __getattr__(self, name):
            return getattr(self.fs, name)

    monkeypatch.setattr(embed_module, "filesystem", Outage)
    with pytest.raises(StorageError, match=f"publishing 2 staged parts .* endpoint {moto_url} failed .*EndpointConnectionError"
                                           ".*--overwrite` when the endpoint answers"):
        finalize_embeddings(root, MODEL, "1")
    monkeypatch.setattr(embed_module, "filesystem", real)
    assert embedding_partitions(root) == []  # the marked partition is read by no one
    with pytest.raises(InputError, match="already exist"):
        finalize_embeddings(root, MODEL, "1")
    assert finalize_embeddings(root, MODEL, "1", overwrite=True)["files"] == ["part-00000.parquet", "part-00001.parquet"]
    _same_rows(read_embeddings(root, MODEL, "1"), read_embeddings(full["root"], MODEL, "1"))


def test_cli_shards_and_finalize(full, tmp_path):
    exe = shutil.which("sarflow", path=str(__import__("pathlib").Path(sys.executable).parent))
    root = tmp_path / "features"
    n_shards = -(-full["embed"]["rows"] // 16)
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": full["uri"]}
    base = [exe, "embed", str(full["store"]), "--model", f"models:/{MODEL}/1", "--features-root", str(root), "--batch-size", "16"]
    ranges = shard_ranges(str(full["store"]), 2)  # the fan-out's work list
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == n_shards
    for a, b in ranges:
        out = subprocess.run(base + ["--shards", f"{a}:{b}"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
    bad = subprocess.run(base + ["--shards", "2-3"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "A:B" in bad.stderr
    out = subprocess.run(base + ["--finalize"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == ["part-00000.parquet", "part-00001.parquet"]
    _same_rows(read_embeddings(root, MODEL, "1"), read_embeddings(full["root"], MODEL, "1"))


# ---------------------------------------------------------------- Feast: materialisation by parts, SQL registry

@pytest.fixture(scope="module")
def parted(full, tmp_path_factory):
    """A features root whose partition was published from two staged parts."""
    root = tmp_path_factory.mktemp("parted") / "features"
    _embed_in_parts(full, root, [(0, 2), (2, -(-full["embed"]["rows"] // 16))])
    finalize_embeddings(root, MODEL, "1")
    return root


def _online(cfg, ids) -> np.ndarray:
    from sarflow.features.feast_store import online_features

    df = online_features(cfg, ids, [f"{VIEW}:embedding"]).set_index("chip_id").loc[ids]
    return np.stack(df.embedding.to_numpy())


def test_materializing_two_parts_equals_one_full_materialization(parted, tmp_path):
    from sarflow.features.feast_store import FeatureConfig, apply, materialize

    table = read_embeddings(parted, MODEL, "1").to_pandas()
    ids = table.chip_id.tolist()
    one = FeatureConfig(root=str(parted), repo=tmp_path / "one")
    apply(one)
    whole = materialize(one)[VIEW]
    two = FeatureConfig(root=str(parted), repo=tmp_path / "two")
    apply(two)
    r0, r1 = materialize(two, part=0)[VIEW], materialize(two, part=1)[VIEW]
    assert (r0["parts"], r0["files"], r1["files"]) == (2, ["part-00000.parquet"], ["part-00001.parquet"])
    assert r0["rows"] > 0 and r1["rows"] > 0 and r0["rows"] + r1["rows"] == whole["rows"] == len(table)
    got = _online(two, ids)
    assert np.array_equal(got, _online(one, ids))
    np.testing.assert_allclose(got, np.stack(table.embedding.to_numpy()), rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two" / "materialized" / VIEW).iterdir()) == ["part-00000.json", "part-00001.json"]
    assert materialize(two, part=1)[VIEW]["rows"] == 0  # incremental per part
    assert materialize(two)[VIEW]["rows"] == 0  # and a full run sees what the parts did
    assert materialize(two, part=2)[VIEW] | {"seconds": 0, "rows_per_s": 0} == \
        {"rows": 0, "parts": 2, "files": [], "seconds": 0, "rows_per_s": 0}


def _postgres_database():
    """A fresh database on the PostgreSQL at 127.0.0.1:5432 (trust auth); skip when there is none."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)
    except psycopg2.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (the cluster's Feast registry)")
    conn.autocommit = True
    name = f"sarflow_feast_{uuid.uuid4().hex[:10]}"
    conn.cursor().execute(f"CREATE DATABASE {name}")
    return conn, name


@pytest.mark.integration
def test_sql_registry_on_postgres_and_redis_parts_shared_by_separate_processes(parted, tmp_path):
    """One process applies into a SQL registry on PostgreSQL, two others materialize one part each
    into Redis (no apply, their own empty repos), a fourth reads the features back: every process
    sees the registry the first wrote, and the state the parts left is where all of them look."""
    import os

    import psycopg2
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 (the cluster configuration's online store)")
    conn, db = _postgres_database()
    try:
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
        params = tmp_path / "params.yaml"
        project = f"sarflow_{uuid.uuid4().hex[:8]}"  # its own keys in the shared Redis
        params.write_text(f"features:\n  root: {parted}\n  online: redis\n  project: {project}\n")
        exe = str(__import__("pathlib").Path(sys.executable).with_name("sarflow"))
        env = {**os.environ, "SARFLOW_FEAST_REGISTRY": url}

        def cli(*args, repo):
            out = subprocess.run([exe, "features", *args, "--params", str(params), "--repo", str(tmp_path / repo)],
                                 capture_output=True, text=True, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            return out.stdout

        assert VIEW in json.loads(cli("apply", repo="apply"))
        assert not (tmp_path / "apply" / "registry.db").exists()  # the registry is in PostgreSQL
        with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as c2:
            cur = c2.cursor()
            cur.execute("SELECT feature_view_name FROM feature_views WHERE project_id = %s", (project,))
            assert VIEW in {r[0] for r in cur.fetchall()}
        rows = [json.loads(cli("materialize", "--no-apply", "--part", str(i), repo=f"pod{i}"))[VIEW]["rows"] for i in (0, 1)]
        table = read_embeddings(parted, MODEL, "1").to_pandas()
        assert rows[0] > 0 and sum(rows) == len(table)
        again = json.loads(cli("materialize", "--no-apply", repo="pod2"))[VIEW]
        assert again["rows"] == 0 and again["parts"] == 2  # a third pod sees both parts' state under the root
        assert (parted / "materialized" / "redis=127.0.0.1:6379" / project / VIEW / "part-00001.json").is_file()
        ids = [table.chip_id.iloc[0], table.chip_id.iloc[-1]]  # one chip of each part
        got = json.loads(cli("get", *ids, repo="reader"))
        np.testing.assert_allclose(np.array([r["embedding"] for r in got], dtype=np.float32),
                                   np.stack(table.embedding.iloc[[0, -1]].to_numpy()), rtol=1e-6)
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()

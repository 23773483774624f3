"""Embeddings into Feast: embed, apply, streaming materialize, online and historical retrieval,
the feature server over HTTP, Redis, similarity search, and bad inputs; then the same over an S3
offline source (moto in server mode on 127.0.0.1) with a local Feast repo: atomic writes to
s3://, the `chip_bags` view and the `llp_training` service, the CLI with --features-root s3://... --repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from helpers import tiny_features
from sarflow.errors import InputError
from sarflow.features.embed import _chip_batches, embed_store, embedding_matrix, encoder_arrays, encoder_chips, read_embeddings
from sarflow.features.labels import chip_labels
from sarflow.features.feast_store import FeatureConfig, apply, materialize, online_features, training_set
from servers import free_port, stop, wait_http

MODEL = "sarflow-encoder-mae"
VIEW = "chip_embeddings_mae_v1"


@pytest.fixture(scope="module")
def featured(tiny_store, tmp_path_factory):
    """A DVC-versioned tiny store, a registered tiny MAE, its embeddings and labels, applied + materialized."""
    built = tiny_features(tiny_store, tmp_path_factory.mktemp("features"), MODEL)
    return {**built, "report": materialize(built["cfg"])}


def test_embeddings_equal_a_direct_forward_pass(featured):
    import mlflow

    table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
    g = zarr.open_group(str(featured["store"]), mode="r")
    assert len(table) == g.attrs["chips"] and table["chip_id"].is_unique
    assert set(table.model_version) == {"1"} and set(table.dataset_version) == {featured["dataset_version"]}
    encoder = mlflow.pytorch.load_model(f"models:/{MODEL}/1")
    chips = pd.read_parquet(featured["store"] / "chips.parquet").set_index("chip_id")["index"]
    rows = [chips[c] for c in table.chip_id[:10]]
    arrays = encoder_arrays(g, encoder, str(featured["store"]))  # the sources the encoder was trained on
    assert encoder.modalities == list(g.attrs["inputs"])  # every input source of the store, no label
    with torch.no_grad():
        direct = encoder(torch.from_numpy(np.concatenate([encoder_chips(arrays, slice(r, r + 1)) for r in rows]))).numpy()
    np.testing.assert_allclose(np.stack(table.embedding[:10].to_numpy()), direct, rtol=1e-5, atol=1e-5)
    assert (featured["root"] / "embeddings" / f"model={MODEL}" / "version=1").is_dir()


def test_chip_batches_come_in_order_and_raise_the_readers_errors():
    a = zarr.array(np.arange(10 * 3 * 4 * 4, dtype=np.float32).reshape(10, 3, 4, 4))
    b = zarr.array(np.arange(10 * 2 * 4 * 4, dtype=np.int16).reshape(10, 2, 4, 4) % 7)
    b.attrs["nodata_in_store"] = 0  # an integer array's nodata is masked (the one reader), never a value
    expected = np.concatenate([a[:][:, [2, 0]], b[:][:, [1]]], axis=1).astype(np.float32)
    expected[:, 2][b[:][:, 1] == 0] = np.nan
    assert np.isnan(expected).any()
    for prefetch in (0, 1, 2, 5):
        for workers in (1, 3):  # several reader threads still yield the batches in order
            got = torch.cat(list(_chip_batches([(a, [2, 0]), (b, [1])], 10, 3, prefetch=prefetch, workers=workers)))
            assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected, equal_nan=True)
    got = torch.cat(list(_chip_batches([(a, [2, 0]), (b, [1])], 10, 3, start=4, workers=2)))  # a shard range's rows
    assert np.array_equal(got.numpy(), expected[4:], equal_nan=True)
    assert zarr.config.get("codec_pipeline.batch_size") == 1  # the reader's knob is restored

    class Failing:
        shape = a.shape
        attrs = {}

        def __getitem__(self, key):
            if key.start >= 6:
                raise OSError("chip 6 is unreadable")
            return a[key]

    with pytest.raises(OSError, match="chip 6"):
        list(_chip_batches([(Failing(), [0])], 10, 3))
    batches = _chip_batches([(a, [0])], 10, 1)
    next(batches)
    batches.close()  # stopped early: what was read ahead is dropped
    assert not [t for t in threading.enumerate() if t.name.startswith("sarflow-embed-read")]


def test_online_features_match_the_offline_source_and_materialize_is_incremental(featured):
    cfg = featured["cfg"]
    assert featured["report"][VIEW]["rows"] == featured["embed"]["rows"]
    table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
    ids = table.chip_id[:5].tolist()
    df = online_features(cfg, ids, [f"{VIEW}:embedding", "chip_labels:worldcover__frac_80"])
    np.testing.assert_allclose(np.stack(df.embedding.to_numpy()), np.stack(table.embedding[:5].to_numpy()), rtol=1e-6)
    assert df.worldcover__frac_80.between(0, 1).all()
    again = materialize(cfg)
    assert again[VIEW]["rows"] == 0  # nothing new


def test_unknown_chip_id_is_an_error(featured):
    with pytest.raises(InputError, match="unknown chip id"):
        online_features(featured["cfg"], ["EPSG32632_r10_c32_s32_x0_y0"], [f"{VIEW}:embedding"])


def test_training_set_is_point_in_time_correct(featured):
    table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
    written = table.event_timestamp.iloc[0]
    ids = table.chip_id[:4].tolist()
    entity = pd.DataFrame({"chip_id": ids * 2,
                           "event_timestamp": [written - pd.Timedelta(days=1)] * 4 + [written + pd.Timedelta(hours=1)] * 4})
    df = training_set(featured["cfg"], entity, [f"{VIEW}:embedding", "chip_labels:worldcover__frac_10"])
    before = df[df.event_timestamp < written]
    after = df[df.event_timestamp > written].set_index("chip_id").loc[ids]
    assert before.embedding.isna().all()  # the embedding did not exist yet
    np.testing.assert_allclose(np.stack(after.embedding.to_numpy()), np.stack(table.embedding[:4].to_numpy()), rtol=1e-6)
    assert after.worldcover__frac_10.notna().all()



def test_a_relative_features_root_is_the_working_directory_s_not_the_feast_repo_s(featured, tmp_path, monkeypatch):
    """`--features-root data/features` as the README writes it: the root is resolved once, where the
    command runs, and Feast's sources hold the absolute path (Feast resolves a relative one
    against its repo folder, where there is nothing)."""
    import shutil

    from sarflow.features.feast_store import FeatureConfig, apply

    work = tmp_path / "work"
    shutil.copytree(featured["root"], work / "data" / "features", ignore=shutil.ignore_patterns("feast"))
    monkeypatch.chdir(work)
    cfg = FeatureConfig(root="data/features")
    assert cfg.root == str(work / "data" / "features") and cfg.repo == work / "data" / "features" / "feast"
    apply(cfg)
    monkeypatch.chdir(tmp_path)  # a later command elsewhere reads the same sources
    table = read_embeddings(cfg.root, MODEL, "1").to_pandas()
    entity = pd.DataFrame({"chip_id": table.chip_id[:3], "event_timestamp": [table.event_timestamp.iloc[0] + pd.Timedelta(hours=1)] * 3})
    df = training_set(cfg, entity, [f"{VIEW}:embedding"]).set_index("chip_id").loc[table.chip_id[:3]]
    np.testing.assert_allclose(np.stack(df.embedding.to_numpy()), np.stack(table.embedding[:3].to_numpy()), rtol=1e-6)

@pytest.mark.integration
def test_feature_server_answers_over_http(featured):
    import requests

    port = free_port()
    feast = str(Path(sys.executable).with_name("feast"))
    log = featured["root"] / f"feast-serve-{port}.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen([feast, "-c", str(featured["cfg"].repo), "serve", "-h", "127.0.0.1", "-p", str(port),
                                   "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, log, seconds=90)
        table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
        r = requests.post(f"http://127.0.0.1:{port}/get-online-features", timeout=10,
                          json={"features": [f"{VIEW}:embedding"], "entities": {"chip_id": table.chip_id[:2].tolist()}})
        r.raise_for_status()
        body = r.json()
        names = body["metadata"]["feature_names"]
        vectors = body["results"][names.index("embedding")]["values"]
        np.testing.assert_allclose(np.array(vectors, dtype=np.float32), np.stack(table.embedding[:2].to_numpy()), rtol=1e-6)
    finally:
        stop(server)


@pytest.mark.integration
def test_redis_online_store(featured, tmp_path):
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 (the cluster configuration's online store)")
    root = tmp_path / "features"
    shutil.copytree(featured["root"] / "embeddings", root / "embeddings")
    cfg = FeatureConfig(root=str(root), online="redis")
    apply(cfg)
    report = materialize(cfg)
    assert report[VIEW]["rows"] == featured["embed"]["rows"]
    table = read_embeddings(root, MODEL, "1").to_pandas()
    df = online_features(cfg, table.chip_id[:3].tolist(), [f"{VIEW}:embedding"])
    np.testing.assert_allclose(np.stack(df.embedding.to_numpy()), np.stack(table.embedding[:3].to_numpy()), rtol=1e-6)


def test_similarity_search_finds_itself_and_agrees_with_brute_force(featured):
    from sarflow.features.search import build_index
    from sarflow.features.similarity import brute_force

    index = build_index(featured["root"], MODEL, "1")
    table = read_embeddings(featured["root"], MODEL, "1")
    vectors = embedding_matrix(table)
    ids = table.column("chip_id").to_pylist()
    hits = index.similar(ids[3], k=5)
    assert hits[0]["chip_id"] == ids[3] and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert {"lon", "lat", "split"} <= set(hits[0])
    found, _ = index.search(vectors[:20], k=5)
    truth, _ = brute_force(ids, vectors, vectors[:20], k=5)
    assert (np.asarray(found) == np.asarray(truth)).mean() > 0.99
    cli = subprocess.run([str(Path(sys.executable).with_name("sarflow")), "features", "similar", ids[3], "--k", "3",
                          "--features-root", str(featured["root"])], capture_output=True, text=True)
    assert cli.returncode == 0 and ids[3] in cli.stdout
    # --model under the one rule: models:/NAME/VERSION names the partition, a bare NAME its newest version there
    for ref in (f"models:/{MODEL}/1", MODEL):
        named = subprocess.run([str(Path(sys.executable).with_name("sarflow")), "features", "similar", ids[3], "--k", "3",
                                "--features-root", str(featured["root"]), "--model", ref], capture_output=True, text=True)
        assert named.returncode == 0 and json.loads(named.stdout) == json.loads(cli.stdout), named.stderr
    missing = subprocess.run([str(Path(sys.executable).with_name("sarflow")), "features", "similar", ids[3],
                              "--features-root", str(featured["root"]), "--model", f"models:/{MODEL}/9"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no embeddings for" in missing.stderr and "v9" in missing.stderr


def _bad_partition(featured, tmp_path, mutate) -> FeatureConfig:
    root = tmp_path / "features"
    shutil.copytree(featured["root"] / "embeddings", root / "embeddings")
    path = root / "embeddings" / f"model={MODEL}" / "version=1"
    cfg = FeatureConfig(root=str(root))
    apply(cfg)
    t = pq.read_table(next(path.glob("*.parquet"))).slice(0, 1).to_pandas()
    mutate(t)
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), path / "part-99999.parquet")
    return cfg


def _online_is_empty(cfg) -> bool:
    with pytest.raises(InputError):
        online_features(cfg, [read_embeddings(cfg.root, MODEL, "1").column("chip_id")[0].as_py()], [f"{VIEW}:embedding"])
    return True


def test_embedding_of_another_dimension_is_refused_before_writing(featured, tmp_path):
    def longer(t):
        t.at[0, "embedding"] = np.zeros(len(t.embedding[0]) + 1, np.float32)
    cfg = _bad_partition(featured, tmp_path, longer)
    with pytest.raises(InputError, match="dimension"):
        materialize(cfg)
    assert _online_is_empty(cfg)


def test_two_model_versions_in_one_view_are_refused(featured, tmp_path):
    def other_version(t):
        t.at[0, "model_version"] = "2"
    cfg = _bad_partition(featured, tmp_path, other_version)
    with pytest.raises(InputError, match="model version"):
        materialize(cfg)
    assert _online_is_empty(cfg)


def test_model_uri_that_does_not_exist_is_refused(featured, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(featured["uri"])
    with pytest.raises(InputError, match="no such model"):
        embed_store(str(featured["store"]), "models:/sarflow-encoder-nope/1", tmp_path / "f")
    with pytest.raises(InputError, match="no such model"):
        embed_store(str(featured["store"]), f"models:/{MODEL}/99", tmp_path / "f")
    assert not (tmp_path / "f" / "embeddings").exists()
    with pytest.raises(InputError, match="already exist"):
        embed_store(str(featured["store"]), f"models:/{MODEL}/1", featured["root"])


# ---------------------------------------------------------------- S3 offline source, chip_bags

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
          "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@pytest.fixture(scope="module")
def s3env(moto_url):
    """The S3 environment of the code under test (module-wide), pointing at the moto server."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", moto_url)
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        for var in ("SARFLOW_S3_ENDPOINT", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        yield moto_url


def _bucket() -> str:
    from sarflow.data.storage import ensure_bucket

    name = f"sarflow-{uuid.uuid4().hex[:12]}"
    ensure_bucket(name)
    return name


@pytest.fixture(scope="module")
def s3featured(featured, s3env, tmp_path_factory):
    """The tiny MAE's embeddings and the labels written to s3://, applied and materialized with a local repo."""
    import mlflow

    mlflow.set_tracking_uri(featured["uri"])
    root = f"s3://{_bucket()}/features"
    result = embed_store(str(featured["store"]), f"models:/{MODEL}/1", root, batch_size=16)
    labels = chip_labels(str(featured["store"]), root)
    cfg = FeatureConfig(root=root, repo=tmp_path_factory.mktemp("s3repo") / "feast")
    names = apply(cfg)
    report = materialize(cfg)
    return {"root": root, "cfg": cfg, "embed": result, "labels": labels, "names": names, "report": report}


def _s3_files(prefix: str) -> list[str]:
    from sarflow.data.storage import s3_filesystem

    fs = s3_filesystem()
    return fs.find(prefix[len("s3://"):]) if fs.exists(prefix[len("s3://"):]) else []


@pytest.mark.integration
def test_embeddings_on_s3_materialize_and_equal_a_direct_forward_pass(featured, s3featured):
    import mlflow

    root, cfg = s3featured["root"], s3featured["cfg"]
    assert s3featured["embed"]["partition"] == f"{root}/embeddings/model={MODEL}/version=1"
    assert [f.rsplit("/", 1)[1] for f in _s3_files(s3featured["embed"]["partition"])] == ["part-00000.parquet"]
    assert not [f for f in _s3_files(root) if "/.partial-" in f]  # temporary keys are gone
    assert str(cfg.repo).startswith(str(Path(cfg.repo).parent)) and not (Path(cfg.repo) / "s3:").exists()
    assert {VIEW, "chip_labels", "similarity", "downstream_training"} <= set(s3featured["names"])
    assert s3featured["report"][VIEW]["rows"] == s3featured["embed"]["rows"]
    table = read_embeddings(root, MODEL, "1").to_pandas()
    ids = table.chip_id[:6].tolist()
    online = online_features(cfg, ids, [f"{VIEW}:embedding", "chip_labels:worldcover__frac_80"]).set_index("chip_id").loc[ids]
    g = zarr.open_group(str(featured["store"]), mode="r")
    chips = pd.read_parquet(featured["store"] / "chips.parquet").set_index("chip_id")["index"]
    encoder = mlflow.pytorch.load_model(f"models:/{MODEL}/1")
    arrays = encoder_arrays(g, encoder, str(featured["store"]))
    with torch.no_grad():
        direct = encoder(torch.from_numpy(np.concatenate([encoder_chips(arrays, slice(chips[c], chips[c] + 1))
                                                          for c in ids]))).numpy()
    np.testing.assert_allclose(np.stack(online.embedding.to_numpy()), direct, rtol=1e-5, atol=1e-5)
    assert online.worldcover__frac_80.between(0, 1).all()
    assert materialize(cfg)[VIEW]["rows"] == 0  # incremental from S3 as well


@pytest.mark.integration
def test_training_set_reads_the_s3_sources(s3featured):
    table = read_embeddings(s3featured["root"], MODEL, "1").to_pandas()
    written = table.event_timestamp.iloc[0]
    ids = table.chip_id[:4].tolist()
    entity = pd.DataFrame({"chip_id": ids, "event_timestamp": [written + pd.Timedelta(hours=1)] * 4})
    df = training_set(s3featured["cfg"], entity, [f"{VIEW}:embedding", "chip_labels:worldcover__frac_10", "chip_labels:worldcover__frac_80"])
    df = df.set_index("chip_id").loc[ids]
    np.testing.assert_allclose(np.stack(df.embedding.to_numpy()), np.stack(table.embedding[:4].to_numpy()), rtol=1e-6)
    assert df.worldcover__frac_10.notna().all() and df.worldcover__frac_80.between(0, 1).all()


@pytest.mark.integration
def test_a_failed_upload_leaves_nothing_at_the_final_key(featured, s3featured, monkeypatch):
    import mlflow
    import s3fs

    mlflow.set_tracking_uri(featured["uri"])
    root = f"s3://{_bucket()}/features"

    def broken_copy(self, *args, **kwargs):
        raise OSError("connection reset in the middle of the copy")

    monkeypatch.setattr(s3fs.S3FileSystem, "copy", broken_copy)
    from sarflow.errors import StorageError

    with pytest.raises(StorageError, match="connection reset.*not published.*rerun"):  # one line, not a botocore trace
        embed_store(str(featured["store"]), f"models:/{MODEL}/1", root, batch_size=16)
    assert _s3_files(root) == []  # neither the partition nor the temporary key
    # and a writer failing half-way through never reaches S3 at all
    monkeypatch.undo()
    from sarflow.data import paths

    def half_written(table, where, **kwargs):
        pq.write_table(table.slice(0, 1), where)
        raise OSError("disk full")

    monkeypatch.setattr(paths, "_write_table", half_written)
    with pytest.raises((OSError, StorageError), match="disk full"):
        embed_store(str(featured["store"]), f"models:/{MODEL}/1", root, batch_size=16)
    assert _s3_files(root) == []


def _bags_table(ids: list[str], ts: datetime) -> pa.Table:
    return pa.table({
        "chip_id": pa.array(ids, pa.string()),
        "bag_ids": pa.array([[f"bag-{i % 3}", f"bag-{i % 3 + 1}"] for i in range(len(ids))], pa.list_(pa.string())),
        "bag_weights": pa.array([[0.75, 0.25] for _ in ids], pa.list_(pa.float64())),
        "area_fractions": pa.array([[0.6, 0.4 + i / 1000] for i in range(len(ids))], pa.list_(pa.float64())),
        "event_timestamp": pa.array([ts] * len(ids), pa.timestamp("us", tz="UTC")),
    })


def _write_s3(table: pa.Table, uri: str) -> None:
    from sarflow.data.storage import s3_filesystem

    with s3_filesystem().open(uri[len("s3://"):], "wb") as f:
        pq.write_table(table, f)


@pytest.mark.integration
def test_chip_bags_view_and_llp_training_service(s3featured):
    from feast import FeatureStore

    root, cfg = s3featured["root"], s3featured["cfg"]
    ids = read_embeddings(root, MODEL, "1").column("chip_id").to_pylist()
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    _write_s3(_bags_table(ids, ts), f"{root}/bags/chip_bags.parquet")
    # the GeoParquet beside it (other columns) must not become part of the source
    _write_s3(pa.table({"bag_id": ["bag-0"], "geometry": [b"\x00"]}), f"{root}/bags/chip_bags_geo.parquet")
    names = apply(cfg)
    assert {"chip_bags", "llp_training"} <= set(names)
    report = materialize(cfg)
    assert report["chip_bags"]["rows"] == len(ids) and report[VIEW]["rows"] == 0
    df = online_features(cfg, ids[:3], ["chip_bags:bag_ids", "chip_bags:bag_weights", "chip_bags:area_fractions"])
    df = df.set_index("chip_id").loc[ids[:3]]
    assert [list(v) for v in df.bag_ids] == [["bag-0", "bag-1"], ["bag-1", "bag-2"], ["bag-2", "bag-3"]]
    assert [list(v) for v in df.bag_weights] == [[0.75, 0.25]] * 3
    np.testing.assert_allclose(list(df.area_fractions.iloc[2]), [0.6, 0.402])
    fs = FeatureStore(repo_path=str(cfg.repo))
    service = fs.get_feature_service("llp_training")
    assert {p.name for p in service.feature_view_projections} == {VIEW, "chip_bags", "chip_labels"}
    online = fs.get_online_features(features=service, entity_rows=[{"chip_id": ids[0]}]).to_dict()
    assert online["bag_ids"][0] == ["bag-0", "bag-1"] and len(online["embedding"][0]) == s3featured["embed"]["dim"]
    hist = training_set(cfg, pd.DataFrame({"chip_id": ids[:2], "event_timestamp": [ts + pd.Timedelta(hours=1)] * 2}),
                        ["chip_bags:bag_ids", "chip_bags:area_fractions"]).set_index("chip_id").loc[ids[:2]]
    assert [list(v) for v in hist.bag_ids] == [["bag-0", "bag-1"], ["bag-1", "bag-2"]]


def test_chip_bags_without_the_contract_columns_is_refused(featured, tmp_path):
    root = tmp_path / "features"
    (root / "bags").mkdir(parents=True)
    shutil.copytree(featured["root"] / "embeddings", root / "embeddings")
    ts = datetime.now(timezone.utc)
    pq.write_table(_bags_table(["a", "b"], ts).drop(["bag_weights"]), root / "bags" / "chip_bags.parquet")
    cfg = FeatureConfig(root=str(root))
    with pytest.raises(InputError, match=r"chip_bags.parquet: chip_bags is missing column\(s\) \['bag_weights'\]"):
        apply(cfg)
    # a file replaced after apply is refused at materialize, before anything is written
    pq.write_table(_bags_table(["a", "b"], ts), root / "bags" / "chip_bags.parquet")
    apply(cfg)
    bad = _bags_table(["a", "b"], ts).set_column(1, "bag_ids", pa.array([1.0, 2.0], pa.float64()))
    pq.write_table(bad, root / "bags" / "chip_bags.parquet")
    with pytest.raises(InputError, match="'bag_ids' is double"):
        materialize(cfg, views=["chip_bags"])


@pytest.mark.integration
def test_s3_root_in_a_bucket_that_does_not_exist_is_refused(featured, s3env, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(featured["uri"])
    root = f"s3://sarflow-missing-{uuid.uuid4().hex[:8]}/features"
    with pytest.raises(InputError, match=rf"{root}: bucket 'sarflow-missing-\w+' does not exist"):
        embed_store(str(featured["store"]), f"models:/{MODEL}/1", root)
    with pytest.raises(InputError, match=rf"{root}: bucket .* does not exist"):
        chip_labels(str(featured["store"]), root)
    with pytest.raises(InputError, match=rf"{root}: bucket .* does not exist"):
        apply(FeatureConfig(root=root, repo=tmp_path / "repo"))
    with pytest.raises(InputError, match="must be a local folder"):
        FeatureConfig(root=root, repo="s3://bucket/repo")


@pytest.mark.integration
def test_cli_over_an_s3_root_with_a_local_repo(s3featured, tmp_path):
    from typer.testing import CliRunner

    from sarflow.cli.features import features_app

    root = s3featured["root"]
    repo = tmp_path / "cli-repo"
    ids = read_embeddings(root, MODEL, "1").column("chip_id").to_pylist()
    run = CliRunner().invoke(features_app, ["materialize", "--features-root", root, "--repo", str(repo)])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)[VIEW]["rows"] == len(ids)
    assert (repo / "registry.db").is_file() and (repo / "online.db").is_file()
    get = CliRunner().invoke(features_app, ["get", ids[0], "--features-root", root, "--repo", str(repo)])
    assert get.exit_code == 0, get.output
    expected = read_embeddings(root, MODEL, "1").to_pandas().set_index("chip_id").embedding[ids[0]]
    np.testing.assert_allclose(np.asarray(json.loads(get.output)[0]["embedding"], np.float32), expected, rtol=1e-6)
    missing = CliRunner().invoke(features_app, ["apply", "--features-root", "s3://sarflow-no-such-bucket/f", "--repo", str(repo)])
    assert missing.exit_code == 2 and "bucket 'sarflow-no-such-bucket' does not exist" in missing.output


@pytest.mark.integration
def test_similarity_search_over_an_s3_root_keeps_its_index_in_the_local_repo(s3featured):
    from sarflow.features.search import index_dir, similar

    root, repo = s3featured["root"], s3featured["cfg"].repo
    ids = read_embeddings(root, MODEL, "1").column("chip_id").to_pylist()
    hits = similar(root, ids[2], k=3, repo=repo)
    assert hits[0]["chip_id"] == ids[2] and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert (index_dir(root, MODEL, "1", repo) / "meta.json").is_file()
    assert str(index_dir(root, MODEL, "1", repo)).startswith(str(repo))

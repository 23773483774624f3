"""Embeddings into Feast: embed, apply, streaming materialize, online and historical retrieval,
the feature server over HTTP, Redis, similarity search, and bad inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from sarflow.errors import InputError
from sarflow.features.embed import embed_store, embedding_matrix, read_embeddings
from sarflow.features.labels import chip_labels
from sarflow.features.store import FeatureConfig, apply, materialize, online_features, training_set
from sarflow.training.methods import OptimConfig
from sarflow.training.pretrain import PretrainConfig, pretrain
from sarflow.training.vit import ViTConfig
from servers import free_port, stop, wait_http

MODEL = "sarflow-encoder-mae"
VIEW = "chip_embeddings_mae_v1"


@pytest.fixture(scope="module")
def featured(tiny_store, tmp_path_factory):
    """A DVC-versioned tiny store, a registered tiny MAE, its embeddings and labels, applied + materialized."""
    import mlflow

    from sarflow.versioning import version_store

    tmp = tmp_path_factory.mktemp("features")
    store = tmp / "chips.zarr"
    shutil.copytree(tiny_store, store)
    version = version_store(store, repo=tmp, push=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    pretrain(PretrainConfig(store=str(store), method="mae", vit=ViTConfig(size="tiny", patch=8, depth=1, dim=32, heads=2),
                            batch_size=8, optim=OptimConfig(max_steps=2, warmup_steps=1), tracking_uri=uri,
                            method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
    mlflow.set_tracking_uri(uri)
    root = tmp / "features"
    result = embed_store(str(store), f"models:/{MODEL}/1", root, batch_size=16)
    chip_labels(str(store), root)
    cfg = FeatureConfig(root=str(root))
    apply(cfg)
    report = materialize(cfg)
    return {"store": store, "root": root, "cfg": cfg, "embed": result, "report": report, "uri": uri,
            "dataset_version": version["dvc_md5"]}


def test_embeddings_equal_a_direct_forward_pass(featured):
    import mlflow

    table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
    g = zarr.open_group(str(featured["store"]), mode="r")
    assert len(table) == g.attrs["chips"] and table["chip_id"].is_unique
    assert set(table.model_version) == {"1"} and set(table.dataset_version) == {featured["dataset_version"]}
    encoder = mlflow.pytorch.load_model(f"models:/{MODEL}/1")
    chips = pd.read_parquet(featured["store"] / "chips.parquet").set_index("chip_id")["index"]
    rows = [chips[c] for c in table.chip_id[:10]]
    with torch.no_grad():
        direct = encoder(torch.from_numpy(g["s1grd"].get_orthogonal_selection((rows,)).astype(np.float32))).numpy()
    np.testing.assert_allclose(np.stack(table.embedding[:10].to_numpy()), direct, rtol=1e-5, atol=1e-5)
    assert (featured["root"] / "embeddings" / f"model={MODEL}" / "version=1").is_dir()


def test_online_features_match_the_offline_source_and_materialize_is_incremental(featured):
    cfg = featured["cfg"]
    assert featured["report"][VIEW]["rows"] == featured["embed"]["rows"]
    table = read_embeddings(featured["root"], MODEL, "1").to_pandas()
    ids = table.chip_id[:5].tolist()
    df = online_features(cfg, ids, [f"{VIEW}:embedding", "chip_labels:water_fraction"])
    np.testing.assert_allclose(np.stack(df.embedding.to_numpy()), np.stack(table.embedding[:5].to_numpy()), rtol=1e-6)
    assert df.water_fraction.between(0, 1).all()
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
    df = training_set(featured["cfg"], entity, [f"{VIEW}:embedding", "chip_labels:frac_10"])
    before = df[df.event_timestamp < written]
    after = df[df.event_timestamp > written].set_index("chip_id").loc[ids]
    assert before.embedding.isna().all()  # the embedding did not exist yet
    np.testing.assert_allclose(np.stack(after.embedding.to_numpy()), np.stack(table.embedding[:4].to_numpy()), rtol=1e-6)
    assert after.frac_10.notna().all()


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
    from sarflow.similarity import brute_force

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
                          "--root", str(featured["root"])], capture_output=True, text=True)
    assert cli.returncode == 0 and ids[3] in cli.stdout


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

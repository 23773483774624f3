"""SimilarityIndex against the numpy brute force: exact, IVF and HNSW, persistence, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

faiss = pytest.importorskip("faiss")

from sarflow.errors import InputError  # noqa: E402
from sarflow.features.similarity import SimilarityIndex, brute_force, recall_at_k  # noqa: E402

DIM = 64


def clustered(n: int, d: int, seed: int, clusters: int = 50, rank: int = 12, centers_seed: int = 0) -> np.ndarray:
    """Mixture of Gaussians on low-rank cluster subspaces (like real embeddings), float32."""
    crng = np.random.default_rng(centers_seed)
    centers = crng.standard_normal((clusters, d)).astype(np.float32)
    bases = (crng.standard_normal((clusters, rank, d)) * (0.8 / np.sqrt(rank))).astype(np.float32)
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, clusters, n)
    z = rng.standard_normal((n, rank)).astype(np.float32)
    x = centers[lab] + np.einsum("nr,nrd->nd", z, bases[lab]) + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32)


def chip_ids(n: int) -> list[str]:
    return [f"EPSG32632_r10_c64_s64_x{i % 997}_y-{i // 997}" for i in range(n)]


@pytest.fixture(scope="module")
def small():
    n = 3000
    x = clustered(n, DIM, seed=1)
    ids = chip_ids(n)
    meta = pd.DataFrame({"split": np.where(np.arange(n) % 5 == 0, "val", "train"),
                         "label": np.arange(n) % 7}, index=pd.Index(ids, name="chip_id"))
    idx = SimilarityIndex(ids, x, meta, model_name="enc-s1", model_version="3")
    return ids, x, meta, idx


@pytest.fixture(scope="module")
def large():
    n = 60_000
    return chip_ids(n), clustered(n, DIM, seed=2)


@pytest.fixture(scope="module")
def ivf(large):
    ids, x = large
    return SimilarityIndex(ids, x, model_name="enc-s1", model_version="3")


# ------------------------------------------------------------------ exact

def test_exact_index_below_threshold(small):
    _, _, _, idx = small
    assert idx.kind == "flat" and type(idx.index).__name__ == "IndexFlatIP"
    assert idx.recall["recall"] == 1.0


def test_nearest_neighbour_is_itself(small):
    ids, x, _, idx = small
    got, sims = idx.search(x[:50], 5)
    assert list(got[:, 0]) == ids[:50]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    hits = idx.similar(ids[123], k=5)
    assert len(hits) == 5
    assert hits[0]["chip_id"] == ids[123]
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    for h in hits:  # metadata columns ride along, as python scalars
        assert h["distance"] == pytest.approx(1 - h["similarity"])
        i = ids.index(h["chip_id"])
        assert h["split"] == ("val" if i % 5 == 0 else "train")
        assert h["label"] == i % 7 and isinstance(h["label"], int)


def test_exact_matches_brute_force(small):
    ids, x, _, idx = small
    q = clustered(40, DIM, seed=9)
    got, sims = idx.search(q, 10)
    want, want_sims = brute_force(ids, x, q, 10)
    assert (got == want).all()
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    # one query as a 1-D vector; a k above the size is cut to the size
    g1, _ = idx.search(q[0], 10)
    assert (g1[0] == want[0]).all()
    assert idx.search(q[:2], 10_000)[0].shape == (2, len(ids))


def test_brute_force_chunks_agree(small):
    ids, x, _, _ = small
    q = clustered(10, DIM, seed=11)
    a_ids, a_s = brute_force(ids, x, q, 7)
    b_ids, b_s = brute_force(ids, x, q, 7, chunk=257)
    assert (a_ids == b_ids).all()
    np.testing.assert_allclose(a_s, b_s, atol=1e-6)


# ------------------------------------------------------------------ approximate

def test_ivf_recall_against_brute_force(ivf, large):
    ids, x = large
    assert ivf.kind == "ivf" and type(ivf.index).__name__ == "IndexIVFFlat"
    assert ivf.params["nlist"] == round(4 * np.sqrt(len(ids)))
    assert ivf.recall["reached"] and ivf.recall["recall"] >= 0.95
    assert 1 <= ivf.params["nprobe"] <= ivf.params["nlist"]
    q = clustered(200, DIM, seed=3)  # fresh chips, not in the index
    got, _ = ivf.search(q, 10)
    want, _ = brute_force(ids, x, q, 10)
    assert recall_at_k(got, want) >= 0.95
    hits = ivf.similar(ids[4321], k=10)
    assert hits[0]["chip_id"] == ids[4321] and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len({h["chip_id"] for h in hits}) == 10


def test_hnsw_recall_against_brute_force():
    n = 20_000
    ids, x = chip_ids(n), clustered(n, DIM, seed=4)
    idx = SimilarityIndex(ids, x, model_name="enc-s1", model_version="3", kind="hnsw")
    assert type(idx.index).__name__ == "IndexHNSWFlat" and idx.recall["recall"] >= 0.95
    q = clustered(200, DIM, seed=5)
    got, _ = idx.search(q, 10)
    want, _ = brute_force(ids, x, q, 10)
    assert recall_at_k(got, want) >= 0.95
    assert idx.similar(ids[7], 3)[0]["chip_id"] == ids[7]


# ------------------------------------------------------------------ persistence

def test_save_load_roundtrip(ivf, large, small, tmp_path):
    ids, x = large
    q = clustered(50, DIM, seed=6)
    d = ivf.save(tmp_path / "idx")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["model_name"] == "enc-s1" and meta["model_version"] == "3"
    assert meta["dimension"] == DIM and meta["metric"] == "cosine" and meta["kind"] == "ivf"
    assert meta["params"]["nprobe"] == ivf.params["nprobe"] and meta["recall"]["recall"] >= 0.95
    assert not list(tmp_path.glob(".*partial"))  # no temporary left behind
    back = SimilarityIndex.load(d, model_name="enc-s1", model_version="3")
    a_ids, a_s = ivf.search(q, 10)
    b_ids, b_s = back.search(q, 10)
    assert (a_ids == b_ids).all()
    np.testing.assert_array_equal(a_s, b_s)
    assert back.similar(ids[99], 5) == ivf.similar(ids[99], 5)

    # overwrite in place (atomic replace of an existing index), with metadata
    s_ids, _, _, sidx = small
    sidx.save(d)
    back2 = SimilarityIndex.load(d)
    assert back2.kind == "flat" and len(back2) == len(s_ids)
    assert back2.similar(s_ids[10], 4) == sidx.similar(s_ids[10], 4)
    assert not list(tmp_path.glob(".*partial"))


def test_load_refuses_other_model_version(small, tmp_path):
    _, _, _, idx = small
    d = idx.save(tmp_path / "idx")
    with pytest.raises(InputError, match="model_version '3', not '4'"):
        SimilarityIndex.load(d, model_name="enc-s1", model_version="4")
    with pytest.raises(InputError, match="model_name"):
        SimilarityIndex.load(d, model_name="enc-s2")
    with pytest.raises(InputError, match="meta.json is missing"):
        SimilarityIndex.load(tmp_path / "nothing")


# ------------------------------------------------------------------ errors

def test_unknown_id_wrong_dimension_empty(small):
    ids, _, _, idx = small
    with pytest.raises(InputError, match="unknown chip id 'nope'"):
        idx.similar("nope")
    with pytest.raises(InputError, match="dimension 32"):
        idx.search(np.ones(32, dtype=np.float32), 5)
    with pytest.raises(InputError, match="dimension"):
        idx.search(np.ones((3, DIM + 1), dtype=np.float32), 5)
    with pytest.raises(InputError, match="all zeros"):
        idx.search(np.zeros(DIM, dtype=np.float32), 5)
    with pytest.raises(InputError, match="positive integer"):
        idx.similar(ids[0], 0)
    empty = SimilarityIndex([], np.zeros((0, DIM), dtype=np.float32), model_name="enc-s1", model_version="3")
    with pytest.raises(InputError, match="empty"):
        empty.search(np.ones(DIM, dtype=np.float32), 5)
    with pytest.raises(InputError, match="empty"):
        empty.similar("x")


def test_bad_build_inputs():
    x = clustered(10, DIM, seed=0)
    with pytest.raises(InputError, match="duplicate chip id"):
        SimilarityIndex(["a"] * 10, x)
    with pytest.raises(InputError, match="9 ids for 10 vectors"):
        SimilarityIndex(chip_ids(9), x)
    with pytest.raises(InputError, match="2-D"):
        SimilarityIndex(chip_ids(10), x[0])
    with pytest.raises(InputError, match="strings"):
        SimilarityIndex(list(range(10)), x)
    x[3] = np.nan
    with pytest.raises(InputError, match="row 3"):
        SimilarityIndex(chip_ids(10), x)


@pytest.mark.slow
def test_sharded_ivfpq_build_gives_the_single_build_s_top10(tmp_path):
    """Issue 14, item 6: trained once, three parts added by two separate processes, merged into one
    on-disk index; the same top-10 (ids and scores) as the in-process build on 100k vectors, and
    the same after a move of the folder (the on-disk lists are found beside the index)."""
    from sarflow.features.similarity import build_ivfpq_sharded

    n = 100_000
    x = clustered(n, 16, seed=11)
    ids = chip_ids(n)
    meta = pd.DataFrame({"split": np.where(np.arange(n) % 5 == 0, "test", "train")}, index=pd.Index(ids))
    kw = dict(nlist=32, pq_m=4, pq_bits=6, nprobe=8, model_name="m", model_version="3")
    single = SimilarityIndex(ids, x, meta, kind="ivfpq", n_threads=1, **kw)
    sharded = build_ivfpq_sharded(ids, x, tmp_path / "idx", meta, parts=3, processes=2, **kw)
    assert sharded.kind == "ivfpq" and sharded.params["part_sizes"] == [33333, 33333, 33334]
    assert (tmp_path / "idx" / "lists.ivfdata").is_file() and len(sharded) == n
    q = clustered(300, 16, seed=12)
    a, sa = single.search(q, 10)
    b, sb = sharded.search(q, 10)
    assert (a == b).all() and np.array_equal(sa, sb)
    truth, _ = brute_force(ids, x, q, 10)
    assert recall_at_k(b, truth) > 0.1  # a real index (4-byte PQ codes: ~0.18 here), not noise (random: 1e-4)
    assert [h["chip_id"] for h in sharded.similar(ids[7], 10)] == [h["chip_id"] for h in single.similar(ids[7], 10)]
    assert sharded.similar(ids[7], 2)[0]["chip_id"] == ids[7] and "split" in sharded.similar(ids[7], 2)[1]
    (tmp_path / "idx").rename(tmp_path / "moved")
    moved = SimilarityIndex.load(tmp_path / "moved", model_name="m", model_version="3")
    assert (moved.search(q, 10)[0] == a).all()
    copy = moved.save(tmp_path / "copy")  # save keeps the lists with it
    assert (SimilarityIndex.load(copy).search(q, 10)[0] == a).all()
    with pytest.raises(InputError, match="model_version"):
        SimilarityIndex.load(copy, model_version="4")

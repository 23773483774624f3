"""Cosine similarity search over chip embeddings, kept consistent with the feature store.

Chip embeddings (one float32 vector per chip id) are materialised into Feast; this module
keeps our own nearest-neighbour index next to them. The index records the model name and
model version of the embeddings (``meta.json``), and :meth:`SimilarityIndex.load` refuses an
index built for another model or version, so a search never mixes embeddings from two models.

Cosine similarity is the inner product of L2-normalised vectors: vectors are normalised at
build time and every query is normalised before the search. ``distance = 1 - similarity``.

Choice of index (``kind="auto"``)
---------------------------------
* fewer than ``exact_threshold`` (50 000) rows: ``IndexFlatIP``, exact. A single exact query
  scans n*d floats on one core: 273 ms at 1M x 768 here, so about 14 ms at 50k x 768 (the
  cost is proportional to n*d), inside the 20 ms goal with no approximation or build cost.
* from 50 000 rows: ``IndexIVFFlat`` (inner product, spherical k-means), ``nlist = 4*sqrt(n)``
  (4000 at 1M; capped so every list has >= 39 training points), trained on a random sample
  of ``train_per_list * nlist`` rows (40 per list, 10 k-means iterations), vectors stored
  uncompressed. ``nprobe`` is tuned at build time: 500 chips held out of the k-means sample
  are searched against their exact top-10 (leave-one-out: the query chip itself is excluded
  on both sides, so it gives no free hit), trying nprobe = 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
  until recall@10 >= ``target_recall`` + ``recall_margin`` (0.95 + 0.01: the margin covers
  the sampling error of 500 queries). The curve and the recall reached are in ``meta.json``.

Measurements (``benchmarks/bench_similarity.py``, results in
``benchmarks/results/similarity.json``): 2 cores AMD EPYC (AVX2), faiss-cpu 1.15.1,
OpenMP 2 threads, other jobs running (load average 5.8 at the start, 2.3 at the end).
1M x 768-d float32 synthetic embeddings: a mixture of 100 Gaussians on rank-32 cluster
subspaces with isotropic noise and uneven cluster sizes. k = 10; 500 single queries (fresh
draws from the mixture, not in the index) through ``search``, one per call; recall@10
against the numpy brute force over the same 1M rows:

======================  ========  ======  ======  =========  ===============================
index                   build s   p50 ms  p99 ms  recall@10  parameters
======================  ========  ======  ======  =========  ===============================
IVFFlat (chosen)        633       5.40    8.02    0.984      nlist 4000, nprobe 48 (tuned)
HNSWFlat                899       6.62    10.85   0.892      M 32, efConstruction 40,
                                                             efSearch 1024 (tuning maximum)
IndexFlatIP (exact)     3         272.7   325.2   1.000      in-repo anchor, 200 queries
Feast + milvus-lite     -         ~280    -       -          reported earlier, 20k rows only
======================  ========  ======  ======  =========  ===============================

IVF's build is 389 s of k-means training, 210 s of list assignment (both BLAS products, so
they use both cores well) and 34 s of nprobe tuning (25 s of it the exact top-10 of the
tuning queries). Its recall rises steadily with nprobe (0.20 at 1, 0.84 at 16, 0.953 at 32,
0.987 at 48), and its cost per query is nearly constant (nprobe lists of ~250 vectors), so
p99 stays close to p50. HNSW with faiss' default construction (M 32, efConstruction 40)
took 1.4x longer to build (graph insertion is latency-bound random memory access) and its
recall flattened at 0.78 to 0.87 for efSearch 16 to 1024 on the tuning sample: the graph does
not connect these clustered data well enough, so it misses the 0.95 goal at every efSearch
tried (up to 1024).
A better graph needs a larger efConstruction/M, which multiplies the build time again on 2
cores and adds memory (the M=32 graph alone is ~0.26 GB at 1M). IVF meets both goals (p50
5.4 ms <= 20 ms, recall 0.984 >= 0.95) at 50x the speed of the exact scan and can be
rebuilt for every model version in ~11 minutes on 2 cores. So ``auto`` picks IVF;
``kind="hnsw"`` stays available (efSearch tuned the same way, up to 1024).

Threads: faiss uses OpenMP; the index sets ``faiss.omp_set_num_threads`` to the cores this
process may use (CPU affinity and the cgroup quota), or ``n_threads``. The setting is
process-wide. A single query runs on one thread (faiss parallelises over queries); the build
and batched searches use all of them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sarflow.errors import InputError

FORMAT = "sarflow.features.similarity/1"
METRIC = "cosine"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METADATA_FILE = "metadata.parquet"
META_FILE = "meta.json"
LISTS_FILE = "lists.ivfdata"  # an on-disk IVF-PQ's inverted lists (build_ivfpq_sharded), beside INDEX_FILE
RESERVED_COLUMNS = ("chip_id", "similarity", "distance")

EXACT_THRESHOLD = 50_000
TARGET_RECALL = 0.95
RECALL_MARGIN = 0.01  # tune to target + margin: the tuning sample's recall has ~0.005 s.d.
RECALL_K = 10
EF_SEARCH_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise InputError("faiss", "faiss-cpu is not installed (pip install faiss-cpu==1.15.1)") from e
    return faiss


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by the cgroup v2/v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        q, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if q != "max":
            quota = int(q) / int(period)
    except (OSError, ValueError):
        try:
            q1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q1 > 0:
                quota = q1 / p1
        except (OSError, ValueError):
            pass
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _normalise_rows(x: np.ndarray, where: str, what: str, out: np.ndarray | None = None,
                    chunk: int = 65_536) -> np.ndarray:
    """L2-normalise the rows of x (float32) into out (may be x itself), in chunks."""
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    for s in range(0, x.shape[0], chunk):
        block = np.asarray(x[s:s + chunk], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = s + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise InputError(where, f"{what} row {bad} has NaN or infinite values")
        norms = np.linalg.norm(block, axis=1)
        if (norms == 0).any():
            bad = s + int(np.flatnonzero(norms == 0)[0])
            raise InputError(where, f"{what} row {bad} is all zeros: cosine similarity is undefined")
        np.divide(block, norms[:, None], out=out[s:s + chunk])
    return out


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 131_072,
                normalise_base: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (positions (m, k) int64, scores (m, k) float32).

    Scans ``base`` in chunks (it may be a memmap); ties are broken by the lower position.
    """
    m = queries.shape[0]
    k = min(k, base.shape[0])
    best_s = np.full((m, 0), -np.inf, dtype=np.float32)
    best_p = np.zeros((m, 0), dtype=np.int64)
    for s in range(0, base.shape[0], chunk):
        block = np.asarray(base[s:s + chunk], dtype=np.float32)
        if normalise_base:
            block = _normalise_rows(block, "brute_force", "vectors")
        sims = queries @ block.T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else \
            np.broadcast_to(np.arange(sims.shape[1]), (m, sims.shape[1]))
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
        cand_p = np.concatenate([best_p, part + s], axis=1)
        order = np.lexsort((cand_p, -cand_s), axis=1)[:, :k]  # by score desc, then position
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_p = np.take_along_axis(cand_p, order, axis=1)
    return best_p, best_s


def brute_force(ids: Sequence[str] | np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                k: int, chunk: int = 131_072) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in numpy (the reference of the tests and the benchmark).

    ``vectors`` (n, d) may be a memmap; it is normalised chunk by chunk. Returns
    ``(ids (m, k) object array, similarities (m, k) float32)``, best first, ties by position.
    """
    ids = np.asarray(ids, dtype=object)
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if vectors.ndim != 2 or q.shape[1] != vectors.shape[1]:
        raise InputError("brute_force", f"queries have dimension {q.shape[1]}, vectors {vectors.shape}")
    if len(ids) != vectors.shape[0]:
        raise InputError("brute_force", f"{len(ids)} ids for {vectors.shape[0]} vectors")
    qn = _normalise_rows(q, "brute_force", "query")
    pos, sims = _exact_topk(vectors, qn, k, chunk=chunk, normalise_base=True)
    return ids[pos], sims


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (m, k) found in the same row of ``found``."""
    k = truth.shape[1]
    if k == 0 or truth.shape[0] == 0:
        return 1.0
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / (truth.shape[0] * k)


def _as_ids(ids, where: str) -> np.ndarray:
    arr = np.asarray(ids, dtype=object) if not isinstance(ids, np.ndarray) else ids
    if arr.ndim != 1:
        raise InputError(where, f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind in "US":
        arr = arr.astype(str).astype(object)
    elif arr.dtype.kind == "O":
        if not all(isinstance(v, str) for v in arr):
            bad = next(v for v in arr if not isinstance(v, str))
            raise InputError(where, f"chip ids must be strings, got {type(bad).__name__} {bad!r}")
        arr = arr.astype(object)
    elif len(arr):
        raise InputError(where, f"chip ids must be strings, got an array of {arr.dtype}")
    else:
        arr = arr.astype(object)
    return arr


class SimilarityIndex:
    """Cosine nearest-neighbour index over chip embeddings (faiss).

    ``SimilarityIndex(ids, vectors, metadata=None, model_name=..., model_version=...)``
    normalises ``vectors`` (n, d) and builds an exact ``IndexFlatIP`` below
    ``exact_threshold`` rows, else an ``IndexIVFFlat`` with ``nprobe`` tuned to
    ``target_recall`` (``kind`` forces "flat", "ivf" or "hnsw"). ``metadata`` is a DataFrame
    indexed by chip id; its columns are returned by :meth:`similar`. With ``copy=False`` a
    float32 C-contiguous ``vectors`` is normalised in place (saves n*d*4 bytes).
    """

    def __init__(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray,
                 metadata: pd.DataFrame | None = None, *, model_name: str | None = None,
                 model_version: str | None = None, kind: str = "auto",
                 exact_threshold: int = EXACT_THRESHOLD, target_recall: float = TARGET_RECALL,
                 recall_margin: float = RECALL_MARGIN,
                 n_threads: int | None = None, seed: int = 0, nlist: int | None = None,
                 train_per_list: int = 40, kmeans_iter: int = 10, hnsw_m: int = 32,
                 ef_construction: int = 40, tune_queries: int = 500, copy: bool = True,
                 add_chunk: int = 65_536, pq_m: int | None = None, pq_bits: int = 8, nprobe: int | None = None):
        faiss = _faiss()
        self.model_name = None if model_name is None else str(model_name)
        self.model_version = None if model_version is None else str(model_version)
        self.path: Path | None = None
        self.n_threads = int(n_threads) if n_threads else available_cores()
        faiss.omp_set_num_threads(self.n_threads)
        where = self._where
        t0 = time.perf_counter()

        self._ids = _as_ids(ids, where)
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            shape = getattr(vectors, "shape", None)
            raise InputError(where, f"vectors must be a 2-D array (n, d), got shape {shape}")
        n, d = vectors.shape
        if d < 1:
            raise InputError(where, "vectors have dimension 0")
        if len(self._ids) != n:
            raise InputError(where, f"{len(self._ids)} ids for {n} vectors")
        self._pos = {cid: i for i, cid in enumerate(self._ids)}
        if len(self._pos) != n:
            dup = pd.Series(self._ids).loc[pd.Series(self._ids).duplicated()].iloc[0]
            raise InputError(where, f"duplicate chip id {dup!r}")
        self.dim = int(d)
        self._metadata = self._align_metadata(metadata, where)

        if not copy and vectors.dtype == np.float32 and vectors.flags.c_contiguous and vectors.flags.writeable:
            xn = _normalise_rows(vectors, where, "vector", out=vectors)
        else:
            xn = _normalise_rows(vectors, where, "vector")

        if kind == "auto":
            kind = "flat" if n < exact_threshold else "ivf"
        if kind not in ("flat", "ivf", "hnsw", "ivfpq"):
            raise InputError(where, f"unknown index kind {kind!r} (auto, flat, ivf, hnsw, ivfpq)")
        self.kind = kind
        self.params: dict[str, Any] = {"exact_threshold": int(exact_threshold), "seed": int(seed),
                                       "n_threads": self.n_threads}
        self.recall: dict[str, Any] = {"k": RECALL_K, "recall": 1.0, "method": "exact"}
        rng = np.random.default_rng(seed)

        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
            self._add(xn, add_chunk)
        elif kind == "ivfpq":  # the in-memory twin of build_ivfpq_sharded (same sample, same training)
            self.index, self.params = _train_ivfpq(lambda pos: xn[pos], n, self.params, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits,
                                                   train_per_list=train_per_list, kmeans_iter=kmeans_iter,
                                                   seed=seed, where=where)
            self._add(xn, add_chunk)
            self.index.make_direct_map()
            self._set_search_param(nprobe or DEFAULT_PQ_NPROBE)
            self.params["nprobe"] = int(nprobe or DEFAULT_PQ_NPROBE)
            self.recall = {"k": RECALL_K, "recall": None, "method": "not measured (fixed nprobe)"}
        elif kind == "ivf":
            if n < 2:
                raise InputError(where, f"an IVF index needs at least 2 vectors, got {n}")
            nl = int(nlist) if nlist else max(1, min(round(4 * math.sqrt(n)), n // 39))
            nl = max(1, min(nl, n))
            n_train = min(n, train_per_list * nl)
            train_pos = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
            quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.niter = int(kmeans_iter)
            self.index.cp.seed = int(seed)
            self.index.cp.max_points_per_centroid = max(train_per_list, 1)
            t_train = time.perf_counter()
            self.index.train(np.ascontiguousarray(xn[train_pos]))
            train_s = time.perf_counter() - t_train
            t_add = time.perf_counter()
            self._add(xn, add_chunk)
            add_s = time.perf_counter() - t_add
            self.index.make_direct_map()
            self.params.update(nlist=nl, train_size=int(n_train), train_per_list=int(train_per_list),
                               kmeans_iter=int(kmeans_iter), spherical=True, train_s=round(train_s, 3),
                               add_s=round(add_s, 3))
            self._tune(xn, rng, train_pos, target_recall, recall_margin, tune_queries)
        else:  # hnsw
            self.index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = int(ef_construction)
            t_add = time.perf_counter()
            self._add(xn, add_chunk)
            self.params.update(M=int(hnsw_m), efConstruction=int(ef_construction),
                               add_s=round(time.perf_counter() - t_add, 3))
            self._tune(xn, rng, np.zeros(0, dtype=np.int64), target_recall, recall_margin, tune_queries)
        self.build_seconds = time.perf_counter() - t0
        self.params["build_s"] = round(self.build_seconds, 3)
        self.created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    # ------------------------------------------------------------------ building

    @property
    def _where(self) -> str:
        if getattr(self, "path", None) is not None:
            return str(self.path)
        name = getattr(self, "model_name", None) or "?"
        version = getattr(self, "model_version", None) or "?"
        return f"similarity index (model {name} version {version})"

    def _align_metadata(self, metadata: pd.DataFrame | None, where: str) -> pd.DataFrame | None:
        if metadata is None:
            return None
        if not isinstance(metadata, pd.DataFrame):
            raise InputError(where, f"metadata must be a pandas DataFrame indexed by chip id, got {type(metadata).__name__}")
        clash = [c for c in metadata.columns if c in RESERVED_COLUMNS]
        if clash:
            raise InputError(where, f"metadata columns {clash} clash with the result fields {list(RESERVED_COLUMNS)}")
        if not metadata.index.is_unique:
            raise InputError(where, "metadata index (chip id) has duplicates")
        meta = metadata.reindex(pd.Index(self._ids, dtype=object))
        meta.index.name = "chip_id"
        return meta

    def _add(self, xn: np.ndarray, chunk: int) -> None:
        for s in range(0, xn.shape[0], chunk):
            self.index.add(np.ascontiguousarray(xn[s:s + chunk]))

    def _set_search_param(self, value: int) -> None:
        if self.kind in ("ivf", "ivfpq"):
            self.index.nprobe = int(value)
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)

    def _tune(self, xn: np.ndarray, rng: np.random.Generator, train_pos: np.ndarray,
              target: float, margin: float, n_queries: int) -> None:
        """Smallest nprobe / efSearch whose leave-one-out recall@10 on held-out queries is
        >= target + margin (candidates grow by ~1.5x: 1, 2, 3, 4, 6, 8, 12, 16, 24, ...)."""
        n = xn.shape[0]
        k = min(RECALL_K, n - 1)
        held = np.setdiff1d(np.arange(n), train_pos, assume_unique=True)
        if len(held) < min(n_queries, n) // 2:  # (almost) everything was a training point
            held = np.arange(n)
        qpos = np.sort(rng.choice(held, size=min(n_queries, len(held)), replace=False))
        q = np.ascontiguousarray(xn[qpos])
        t = time.perf_counter()
        truth, _ = _exact_topk(xn, q, k + 1)
        truth = _drop_self(truth, qpos, k)
        truth_s = time.perf_counter() - t

        if self.kind == "ivf":
            nl = self.index.nlist
            steps = sorted({v for i in range(0, 32) for v in (2 ** i, 3 * 2 ** i // 2) if v >= 1})
            cands = [v for v in steps if v < nl] + [nl]
            name = "nprobe"
        else:
            cands = list(EF_SEARCH_CANDIDATES)
            name = "efSearch"
        goal = min(1.0, target + margin)
        curve = []
        chosen = None
        for c in cands:
            self._set_search_param(c)
            t = time.perf_counter()
            _, found = self.index.search(q, k + 1)
            ms = (time.perf_counter() - t) * 1000 / len(qpos)
            r = recall_at_k(_drop_self(found, qpos, k), truth)
            curve.append({name: int(c), "recall": round(r, 4), "batch_ms_per_query": round(ms, 4)})
            if r >= goal:
                chosen = (c, r)
                break
        if chosen is None:  # the goal was never reached: keep the most accurate setting tried
            best = max(curve, key=lambda e: (e["recall"], -e[name]))
            chosen = (int(best[name]), float(best["recall"]))
        self._set_search_param(int(chosen[0]))
        self.params[name] = int(chosen[0])
        self.recall = {"k": k, "recall": round(float(chosen[1]), 4), "target": target, "margin": margin,
                       "reached": bool(chosen[1] >= target),
                       "method": "leave-one-out (query chip excluded) on chips held out of the k-means sample",
                       "n_queries": int(len(qpos)), "tuned": name, "curve": curve, "truth_s": round(truth_s, 3)}

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    def __contains__(self, chip_id: object) -> bool:
        return chip_id in self._pos

    def _check_nonempty(self) -> None:
        if len(self._ids) == 0:
            raise InputError(self._where, "the similarity index is empty: no embeddings were indexed")

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(self._where, f"k must be a positive integer, got {k!r}")
        return int(k)

    def search(self, query_vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity for each query: ``(ids (m, k), similarities (m, k))``.

        ``query_vectors`` is (d,) or (m, d); queries are normalised. k larger than the index is
        cut to its size; a slot an approximate index could not fill has id None and NaN.
        """
        self._check_nonempty()
        k = min(self._check_k(k), len(self._ids))
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(self._where, f"query has dimension {q.shape[-1] if q.ndim else 0} "
                                          f"(shape {np.shape(query_vectors)}), the index has {self.dim}")
        qn = _normalise_rows(q, self._where, "query")
        sims, pos = self.index.search(qn, k)
        return self._to_ids(pos), _nan_missing(sims, pos)

    def _to_ids(self, pos: np.ndarray) -> np.ndarray:
        out = self._ids[np.where(pos >= 0, pos, 0)]
        out[pos < 0] = None
        return out

    def vector(self, chip_id: str) -> np.ndarray:
        """The stored (normalised) embedding of a chip."""
        self._check_nonempty()
        pos = self._pos.get(chip_id)
        if pos is None:
            raise InputError(self._where, f"unknown chip id {chip_id!r}: it is not in this index "
                                          f"({len(self)} chips, model {self.model_name} version {self.model_version})")
        return self.index.reconstruct(int(pos))

    def similar(self, chip_id: str, k: int = 10) -> list[dict[str, Any]]:
        """The k chips most similar to ``chip_id``, the chip itself first.

        Each hit is ``{"chip_id", "similarity", "distance" (1 - similarity), **metadata}``.
        """
        k = self._check_k(k)
        v = self.vector(chip_id)
        pos = self._pos[chip_id]
        kk = min(k + 1, len(self._ids))
        sims, found = self.index.search(v[None, :], kk)
        rows = [(pos, float(np.dot(v, v)))]
        rows += [(int(p), float(s)) for p, s in zip(found[0], sims[0]) if p >= 0 and p != pos]
        rows = rows[:min(k, len(self._ids))]
        cols = {} if self._metadata is None else {c: self._metadata[c].to_numpy() for c in self._metadata.columns}
        out = []
        for p, s in rows:
            hit = {"chip_id": self._ids[p], "similarity": s, "distance": 1.0 - s}
            hit.update({c: _py(arr[p]) for c, arr in cols.items()})
            out.append(hit)
        return out

    def set_search_param(self, value: int) -> None:
        """Override the tuned nprobe (IVF) or efSearch (HNSW); ignored for an exact index."""
        self._set_search_param(value)
        if self.kind in ("ivf", "ivfpq"):
            self.params["nprobe"] = int(value)
        elif self.kind == "hnsw":
            self.params["efSearch"] = int(value)

    # ------------------------------------------------------------------ persistence

    def info(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_name": self.model_name, "model_version": self.model_version,
                "dimension": self.dim, "metric": METRIC, "normalised": True, "kind": self.kind,
                "faiss_index": type(self.index).__name__, "n": len(self._ids), "params": self.params,
                "recall": self.recall, "build_seconds": round(self.build_seconds, 3),
                "created_at": self.created_at, "faiss_version": _faiss().__version__,
                "has_metadata": self._metadata is not None,
                "metadata_columns": [] if self._metadata is None else [str(c) for c in self._metadata.columns]}

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (a temporary sibling, then renames)."""
        faiss = _faiss()
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.partial"
        tmp.mkdir()
        try:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            lists = getattr(self, "_lists_file", None)
            if lists is not None:  # an on-disk index: its lists go along (found beside the index on load)
                shutil.copyfile(lists, tmp / LISTS_FILE)
            pd.DataFrame({"chip_id": pd.array(self._ids, dtype="string")}).to_parquet(tmp / IDS_FILE, index=False)
            if self._metadata is not None:
                self._metadata.to_parquet(tmp / METADATA_FILE)
            meta = self.info()
            meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
            for p in tmp.iterdir():
                _fsync(p)
            _fsync(tmp)
            old = None
            if directory.exists():
                if not (directory / META_FILE).is_file() and any(directory.iterdir()):
                    raise InputError(str(directory), "exists and is not a similarity index; refusing to replace it")
                old = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.old.partial"
                directory.rename(old)
            tmp.rename(directory)
            _fsync(directory.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, model_name: str | None = None, model_version: str | None = None,
             *, n_threads: int | None = None, mmap: bool = False) -> "SimilarityIndex":
        """Read an index written by :meth:`save`.

        When ``model_name`` / ``model_version`` are given they must equal the ones the index
        was built for (the embeddings in the feature store), else :class:`InputError`.
        ``mmap=True`` maps the faiss file instead of reading it (flat / IVF / HNSW).
        """
        faiss = _faiss()
        directory = Path(directory)
        where = str(directory)
        mf = directory / META_FILE
        if not mf.is_file():
            raise InputError(where, f"not a similarity index: {META_FILE} is missing")
        try:
            meta = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(str(mf), f"unreadable: {e}") from e
        if meta.get("format") != FORMAT:
            raise InputError(str(mf), f"format {meta.get('format')!r} is not {FORMAT!r}")
        for field, want in (("model_name", model_name), ("model_version", model_version)):
            if want is not None and meta.get(field) != str(want):
                raise InputError(where, f"the index was built for {field} {meta.get(field)!r}, "
                                        f"not {str(want)!r}: rebuild it from the embeddings of that model")
        for name, size in meta.get("files", {}).items():
            p = directory / name
            if not p.is_file() or p.stat().st_size != size:
                raise InputError(str(p), f"missing or truncated (expected {size} bytes)")
        self = cls.__new__(cls)
        self.path = directory
        self.model_name = meta.get("model_name")
        self.model_version = meta.get("model_version")
        self.dim = int(meta["dimension"])
        self.kind = meta["kind"]
        self.params = dict(meta.get("params", {}))
        self.recall = dict(meta.get("recall", {}))
        self.build_seconds = float(meta.get("build_seconds", 0.0))
        self.created_at = meta.get("created_at")
        self.n_threads = int(n_threads) if n_threads else available_cores()
        self.params["n_threads"] = self.n_threads
        faiss.omp_set_num_threads(self.n_threads)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        self._lists_file = None
        if (directory / LISTS_FILE).is_file():  # on-disk lists, opened from beside the index wherever it moved
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
            self._lists_file = directory / LISTS_FILE
        self.index = faiss.read_index(str(directory / INDEX_FILE), flags)
        self._ids = _as_ids(_read_small_parquet(directory / IDS_FILE)["chip_id"].to_numpy(dtype=object), where)
        if self.index.ntotal != len(self._ids) or self.index.d != self.dim:
            raise InputError(where, f"index has {self.index.ntotal} vectors of dimension {self.index.d}, "
                                    f"ids {len(self._ids)}, meta.json dimension {self.dim}")
        self._pos = {cid: i for i, cid in enumerate(self._ids)}
        self._metadata = None
        if meta.get("has_metadata"):
            md = _read_small_parquet(directory / METADATA_FILE)
            md.index = pd.Index(self._ids, dtype=object, name="chip_id")
            self._metadata = md
        if self.kind in ("ivf", "ivfpq"):
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type == 0:
                ivf.make_direct_map()
            self._set_search_param(self.params["nprobe"])
        elif self.kind == "hnsw":
            self._set_search_param(self.params["efSearch"])
        return self

    def __repr__(self) -> str:
        extra = {k: self.params[k] for k in ("nlist", "nprobe", "M", "efSearch") if k in self.params}
        return (f"SimilarityIndex(kind={self.kind!r}, n={len(self)}, dim={self.dim}, model={self.model_name!r}, "
                f"version={self.model_version!r}, {extra}, recall@{self.recall.get('k')}={self.recall.get('recall')})")


def _read_small_parquet(path: Path) -> pd.DataFrame:
    """An index's side file (ids, metadata), read on this thread. Arrow's CPU thread pool in a
    process that also ran faiss's OpenMP threads made ~1 in 30 processes abort at exit
    ("terminate called without an active exception": 3 of 80 runs with the pool, 0 of 80
    without, on 2 loaded cores), and these files are small enough not to need it."""
    import pyarrow.parquet as pq

    return pq.read_table(path, use_threads=False).to_pandas(use_threads=False)


def _drop_self(pos: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own position from its row of results and keep the first k."""
    out = np.full((pos.shape[0], k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(pos, self_pos)):
        keep = row[(row != me) & (row >= 0)][:k]
        out[i, :len(keep)] = keep
    return out


def _nan_missing(sims: np.ndarray, pos: np.ndarray) -> np.ndarray:
    sims = sims.astype(np.float32, copy=False)
    if (pos < 0).any():
        sims = sims.copy()
        sims[pos < 0] = np.nan
    return sims


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------ IVF-PQ at 10M+ vectors, built in parts

DEFAULT_PQ_NPROBE = 16
TRAINED_FILE = "trained.faiss"


def _default_pq_m(d: int) -> int:
    """Sub-quantizers of a PQ code: the largest divisor of d up to d/8 (96 bytes a vector at 768-d)."""
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def _train_ivfpq(rows, n: int, params: dict, *, nlist: int | None, pq_m: int | None, pq_bits: int,
                 train_per_list: int, kmeans_iter: int, seed: int, where: str):
    """An empty IVF-PQ (inner product, spherical coarse k-means) trained on a random sample of
    the n vectors; `rows(positions)` returns those rows L2-normalised. Returns (index, params)."""
    faiss = _faiss()
    if n < 2:
        raise InputError(where, f"an IVF-PQ index needs at least 2 vectors, got {n}")
    d = int(rows(np.arange(1)).shape[1])
    m = int(pq_m) if pq_m else _default_pq_m(d)
    if m < 1 or d % m:
        raise InputError(where, f"pq_m {m} does not divide the dimension {d}")
    nl = int(nlist) if nlist else max(1, min(round(4 * math.sqrt(n)), n // 39))
    nl = max(1, min(nl, n))
    n_train = min(n, max(train_per_list * nl, 39 * 2 ** int(pq_bits)))  # enough for the PQ codebooks too
    rng = np.random.default_rng(seed)
    train_pos = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nl, m, int(pq_bits), faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = int(kmeans_iter)
    index.cp.seed = int(seed)
    index.cp.max_points_per_centroid = max(train_per_list, 1)
    index.cp.spherical = True
    t = time.perf_counter()
    index.train(np.ascontiguousarray(rows(train_pos)))
    return index, {**params, "nlist": nl, "pq_m": m, "pq_bits": int(pq_bits), "train_size": int(n_train),
                   "train_per_list": int(train_per_list), "kmeans_iter": int(kmeans_iter), "spherical": True,
                   "train_s": round(time.perf_counter() - t, 3)}


def add_ivfpq_part(trained: str | Path, vectors: np.ndarray, start: int, out: str | Path,
                   n_threads: int | None = None) -> Path:
    """One part of a sharded build (any process or pod): the trained, empty IVF-PQ at `trained`
    with `vectors` (rows [start, start + len) of the whole set) added under their global
    positions, written atomically to `out`."""
    faiss = _faiss()
    faiss.omp_set_num_threads(int(n_threads) if n_threads else available_cores())
    index = faiss.read_index(str(trained))
    if index.ntotal:
        raise InputError(str(trained), "the trained index is not empty: parts are added to the empty trained index")
    xn = _normalise_rows(vectors, f"{out}", f"vector (part from {start}), relative")
    index.add_with_ids(xn, np.arange(start, start + len(xn), dtype=np.int64))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_part_job(args: tuple) -> str:
    """A worker process's part: rows [a, b) of the .npy at `npy` (memory-mapped)."""
    trained, npy, a, b, out, threads = args
    return str(add_ivfpq_part(trained, np.load(npy, mmap_mode="r")[a:b], a, out, threads))


def merge_ivfpq_parts(directory: str | Path, trained: str | Path, parts: Sequence[str | Path],
                      ids: Sequence[str] | np.ndarray, metadata: pd.DataFrame | None = None, *,
                      model_name: str | None = None, model_version: str | None = None, nprobe: int | None = None,
                      params: dict | None = None) -> "SimilarityIndex":
    """Merges the parts (in order; their ids are global positions) into one on-disk index at
    `directory` (index.faiss + lists.ivfdata, the inverted lists memory-mapped on load), with
    the chip ids and metadata as SimilarityIndex.save writes them, atomically; returns it loaded.
    The parts must cover positions 0..len(ids)-1 exactly once."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    directory = Path(directory)
    where = str(directory)
    ids = _as_ids(ids, where)
    counts = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP).ntotal for p in parts]
    if sum(counts) != len(ids):
        raise InputError(where, f"the parts hold {sum(counts)} vectors ({counts}), the ids are {len(ids)}")
    index = faiss.read_index(str(trained))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        t = time.perf_counter()
        merge_ondisk(index, [str(p) for p in parts], str(tmp / LISTS_FILE))
        merge_s = time.perf_counter() - t
        # a part's ids are global positions (position -> chip id): the direct map refuses one outside 0..n-1
        faiss.extract_index_ivf(index).make_direct_map()
        self = SimilarityIndex.__new__(SimilarityIndex)
        self.path, self.index, self._ids, self._lists_file = None, index, ids, tmp / LISTS_FILE
        self._pos = {cid: i for i, cid in enumerate(ids)}
        if len(self._pos) != len(ids):
            raise InputError(where, "duplicate chip ids")
        self.model_name = None if model_name is None else str(model_name)
        self.model_version = None if model_version is None else str(model_version)
        self.dim, self.kind = int(index.d), "ivfpq"
        self._metadata = self._align_metadata(metadata, where)
        self.params = {**(params or {}), "nprobe": int(nprobe or DEFAULT_PQ_NPROBE), "parts": len(parts),
                       "part_sizes": counts, "merge_s": round(merge_s, 3), "on_disk": True}
        self.recall = {"k": RECALL_K, "recall": None, "method": "not measured (fixed nprobe)"}
        self.build_seconds = float(self.params.get("build_s", merge_s))
        self.created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.n_threads = available_cores()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pd.DataFrame({"chip_id": pd.array(ids, dtype="string")}).to_parquet(tmp / IDS_FILE, index=False)
        if self._metadata is not None:
            self._metadata.to_parquet(tmp / METADATA_FILE)
        meta = self.info()
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        del index, self  # close the on-disk lists before the folder moves
        if directory.exists():
            if not (directory / META_FILE).is_file() and any(directory.iterdir()):
                raise InputError(where, "exists and is not a similarity index; refusing to replace it")
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SimilarityIndex.load(directory, model_name=model_name, model_version=model_version)


def build_ivfpq_sharded(ids: Sequence[str] | np.ndarray, vectors: np.ndarray | str | Path, directory: str | Path,
                        metadata: pd.DataFrame | None = None, *, parts: int = 2, processes: int | None = None,
                        model_name: str | None = None, model_version: str | None = None, nlist: int | None = None,
                        pq_m: int | None = None, pq_bits: int = 8, train_per_list: int = 40, kmeans_iter: int = 10,
                        seed: int = 0, nprobe: int | None = None, threads_per_part: int = 1) -> "SimilarityIndex":
    """An IVF-PQ index over 10M+ vectors: trained once on a sample here, the vectors added in
    `parts` contiguous ranges by `processes` separate worker processes (spawned; each writes its
    part with `add_ivfpq_part`), merged into one on-disk index at `directory`
    (`merge_ivfpq_parts`). `vectors` is an (n, d) array or the path of a .npy file (memory-mapped,
    so no process holds all of it). The result answers `similar`/`search` like SimilarityIndex
    and holds the same codes, in the same list order, as `SimilarityIndex(..., kind="ivfpq")`
    built in one process with the same parameters, so both return the same neighbours."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    directory = Path(directory)
    where = str(directory)
    ids = _as_ids(ids, where)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.parts-", dir=directory.parent if directory.parent.exists() else None))
    try:
        if isinstance(vectors, (str, Path)):
            npy = str(vectors)
        else:
            npy = str(work / "vectors.npy")
            np.save(npy, np.asarray(vectors, dtype=np.float32))
        base = np.load(npy, mmap_mode="r")
        if base.ndim != 2 or len(base) != len(ids):
            raise InputError(where, f"{len(ids)} ids for vectors of shape {base.shape}")
        n = len(base)
        parts = max(1, min(int(parts), n))
        index, params = _train_ivfpq(lambda pos: _normalise_rows(base[pos], where, "vector"), n, {"seed": int(seed)},
                                     nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, train_per_list=train_per_list,
                                     kmeans_iter=kmeans_iter, seed=seed, where=where)
        trained = work / TRAINED_FILE
        _faiss().write_index(index, str(trained))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        jobs = [(str(trained), npy, int(a), int(b), str(work / f"part-{i:05d}.faiss"), threads_per_part)
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        t = time.perf_counter()
        with ProcessPoolExecutor(max_workers=processes or min(parts, available_cores()),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_add_part_job, jobs))
        params.update(add_s=round(time.perf_counter() - t, 3), build_s=round(time.perf_counter() - t0, 3))
        return merge_ivfpq_parts(directory, trained, done, ids, metadata, model_name=model_name,
                                 model_version=model_version, nprobe=nprobe, params=params)
    finally:
        shutil.rmtree(work, ignore_errors=True)

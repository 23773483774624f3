"""Feature store benchmark: sarflow's streaming materialization against Feast's own
`materialize` (the anchor) on the same embeddings, and online lookup latency in process and
over the Feast feature server, side by side in one run. Writes benchmarks/results/features.json.

    .venv/bin/python benchmarks/bench_features.py --rows 100000 --dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from sarflow.features.feast_store import FeatureConfig, apply, materialize, open_feature_store

HERE = Path(__file__).resolve().parent


def make_partition(root: Path, rows: int, dim: int) -> list[str]:
    part = root / "embeddings" / "model=sarflow-encoder-bench" / "version=1"
    part.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"EPSG32632_r10_c64_s64_x{i % 1000}_y{i // 1000}" for i in range(rows)]
    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for k, start in enumerate(range(0, rows, 50_000)):
        stop = min(rows, start + 50_000)
        n = stop - start
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        pq.write_table(pa.table({
            "chip_id": ids[start:stop],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim).cast(pa.list_(pa.float32())),
            "model_name": ["sarflow-encoder-bench"] * n, "model_version": ["1"] * n, "dataset_version": ["bench"] * n,
            "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
            "lon": rng.uniform(8, 9, n), "lat": rng.uniform(45, 46, n), "split": ["train"] * n,
        }), part / f"part-{k:05d}.parquet")
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latency(fn, n: int) -> dict:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    work = HERE / "work" / "features"
    shutil.rmtree(work, ignore_errors=True)
    ids = make_partition(work / "ours", args.rows, args.dim)
    shutil.copytree(work / "ours", work / "feast")

    # the anchor: Feast's own materialize over the whole range
    anchor_cfg = FeatureConfig(root=str(work / "feast"))
    apply(anchor_cfg)
    fs = open_feature_store(anchor_cfg)
    t = time.perf_counter()
    fs.materialize(datetime(2025, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc) + timedelta(days=1))
    feast_s = time.perf_counter() - t

    ours_cfg = FeatureConfig(root=str(work / "ours"))
    apply(ours_cfg)
    t = time.perf_counter()
    report = materialize(ours_cfg)
    ours_s = time.perf_counter() - t
    view = next(iter(report))

    fs = open_feature_store(ours_cfg)
    rng = np.random.default_rng(1)
    feats = [f"{view}:embedding"]
    one = lambda: fs.get_online_features(features=feats, entity_rows=[{"chip_id": ids[rng.integers(len(ids))]}]).to_dict()  # noqa: E731
    hundred = lambda: fs.get_online_features(  # noqa: E731
        features=feats, entity_rows=[{"chip_id": ids[i]} for i in rng.integers(len(ids), size=100)]).to_dict()
    in_process = {"1": latency(one, args.queries), "100": latency(hundred, max(20, args.queries // 5))}

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("feast")), "-c", str(ours_cfg.repo), "serve", "-h", "127.0.0.1",
                               "-p", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/get-online-features"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.3)
        post = lambda k: requests.post(url, json={"features": feats, "entities": {  # noqa: E731
            "chip_id": [ids[i] for i in rng.integers(len(ids), size=k)]}}, timeout=10).raise_for_status()
        over_http = {"1": latency(lambda: post(1), args.queries), "100": latency(lambda: post(100), max(20, args.queries // 5))}
    finally:
        server.terminate()
        server.wait(10)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": args.rows, "dim": args.dim, "online_store": "sqlite (embedded default)",
        "materialize": {
            "anchor": "feast FeatureStore.materialize (Feast's default materialization engine)",
            "feast_s": round(feast_s, 2), "feast_rows_per_s": args.rows / feast_s,
            "sarflow_s": round(ours_s, 2), "sarflow_rows_per_s": args.rows / ours_s,
            "ratio": feast_s / ours_s,
        },
        "online_get_in_process": in_process,
        "online_get_feature_server": over_http,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features.json").write_text(json.dumps(result, indent=1))
    m = result["materialize"]
    print(f"materialize {args.rows} x {args.dim}-d: feast {m['feast_rows_per_s']:.0f} rows/s, sarflow "
          f"{m['sarflow_rows_per_s']:.0f} rows/s, ratio {m['ratio']:.1f}x")
    for where, d in (("in process", in_process), ("feature server", over_http)):
        for k, v in d.items():
            print(f"online get {k:>3} chips {where}: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms")


if __name__ == "__main__":
    main()

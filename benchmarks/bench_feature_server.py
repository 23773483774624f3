"""Feature server under load: Feast's default `feast serve` (the anchor) against the flags sarflow
runs it with (sarflow.local.services.feast_serve_flags, as `sarflow services up` and
k8s/base/feast.yaml do), side by side in one run, over the same features root with materialized
rows. Each server gets the same bounded closed-loop load from 127.0.0.1 (N clients, each a
keep-alive `requests.Session` posting /get-online-features for random chips back to back) and
the run reports requests, errors, p50/p95/p99 latency, throughput and the ratios sarflow/anchor.

    .venv/bin/python benchmarks/bench_feature_server.py                 # 8 clients x 20 s per server
    .venv/bin/python benchmarks/bench_feature_server.py --quick         # a smoke of a few seconds
    .venv/bin/python benchmarks/bench_feature_server.py --clients 20 --duration 60 --online redis

Writes benchmarks/results/feature_server.json and .md (feature_server_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import requests

from bench_features import make_partition  # benchmarks/bench_features.py, beside this script
from machine import host, loadavg  # benchmarks/machine.py, beside this script

from sarflow.errors import InputError
from sarflow.features.feast_store import FeatureConfig, apply, materialize, open_feature_store

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
from sarflow.local.services import (feast_serve_command, feast_serve_flags, feast_workers, free_port,
                                    start_server, stop)


def build_root(work: Path, rows: int, dim: int, online: str, redis: str) -> tuple[FeatureConfig, str, list[str]]:
    """A features root with `rows` synthetic embeddings, applied and materialized into the online
    store; returns (config, view, chip ids)."""
    shutil.rmtree(work, ignore_errors=True)
    ids = make_partition(work / "root", rows, dim)
    # a project of its own: a shared Redis keeps other projects' keys apart
    cfg = FeatureConfig(root=str(work / "root"), repo=work / "repo", online=online, redis=redis,
                        project=f"bench_fs_{uuid.uuid4().hex[:8]}")
    apply(cfg)
    report = materialize(cfg)
    view = next(v for v, r in report.items() if r["rows"] == rows)
    return cfg, view, ids


def gunicorn_counts(log: Path) -> dict:
    """Worker boots and recycling exits gunicorn logged ("Maximum request limit of N exceeded"
    from gunicorn 23 on, "Autorestarting worker" before)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return {"worker_boots": len(re.findall(r"Booting worker with pid", text)),
            "recycled": len(re.findall(r"Maximum request limit of \d+ exceeded|Autorestarting worker", text))}


def load(url: str, features: list[str], ids: list[str], clients: int, seconds: float, batch: int,
         seed: int) -> dict:
    """`clients` threads, each posting back to back on its own keep-alive session for `seconds`;
    an error is an exception (connection reset, timeout) or a status other than 200. Latency
    percentiles are of the answered requests (`p*_ms`) and of every request, a failed one at the
    time it took to fail (`p*_all_ms`); `longest_gap_ms`: the longest time no request was answered."""
    stop_at = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    failed: list[list[float]] = [[] for _ in range(clients)]
    done: list[list[float]] = [[] for _ in range(clients)]
    errors: list[dict[str, int]] = [{} for _ in range(clients)]

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        with requests.Session() as s:
            while time.perf_counter() < stop_at:
                body = {"features": features, "entities": {"chip_id": [ids[i] for i in rng.integers(len(ids), size=batch)]}}
                t = time.perf_counter()
                try:
                    r = s.post(url, json=body, timeout=10)
                    kind = None if r.status_code == 200 and b'"results"' in r.content else f"http_{r.status_code}"
                except requests.RequestException as e:
                    kind = type(e).__name__
                end = time.perf_counter()
                if kind is None:
                    lat[k].append((end - t) * 1000)
                    done[k].append(end)
                else:
                    failed[k].append((end - t) * 1000)
                    errors[k][kind] = errors[k].get(kind, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.concatenate([np.asarray(x) for x in lat]) if any(lat) else np.zeros(0)
    kinds: dict[str, int] = {}
    for e in errors:
        for kind, n in e.items():
            kinds[kind] = kinds.get(kind, 0) + n
    n_err = sum(kinds.values())
    n = len(ms) + n_err
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: None)
    every = np.concatenate([ms, *(np.asarray(x) for x in failed)])
    ends = np.sort(np.concatenate([[t0], *(np.asarray(x) for x in done), [t0 + wall]]))
    return {"requests": n, "ok": int(len(ms)), "errors": n_err, "error_rate": n_err / n if n else None,
            "error_kinds": kinds, "wall_s": round(wall, 3), "throughput_rps": len(ms) / wall,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": float(ms.max()) if len(ms) else None,
            "mean_ms": float(ms.mean()) if len(ms) else None, "over_1s": int((every > 1000).sum()),
            **{f"p{q}_all_ms": float(np.percentile(every, q)) if len(every) else None for q in (50, 95, 99)},
            "longest_gap_ms": float(np.diff(ends).max() * 1000)}


def check_answer(base: str, features: list[str], cfg: FeatureConfig, view: str, chip: str) -> None:
    """The server returns the online store's vector for one chip (what the load then asks for)."""
    r = requests.post(base + "/get-online-features", timeout=30, json={"features": features, "entities": {"chip_id": [chip]}})
    r.raise_for_status()
    body = r.json()
    got = np.asarray(body["results"][body["metadata"]["feature_names"].index("embedding")]["values"][0], np.float32)
    want = open_feature_store(cfg).get_online_features(features=features, entity_rows=[{"chip_id": chip}]).to_dict()
    if got.shape != np.asarray(want["embedding"][0]).shape or not np.allclose(got, want["embedding"][0]):
        raise AssertionError(f"{base}: the served embedding of {chip} differs from the online store's")


def run_server(name: str, cmd: list[str], logs: Path, args, cfg, view, ids) -> dict:
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in cmd]
    log = logs / f"{name}.log"
    features = [f"{view}:embedding"]
    t = time.perf_counter()
    proc = start_server(cmd, log, f"http://127.0.0.1:{port}/health", seconds=180)
    startup = time.perf_counter() - t
    try:
        base = f"http://127.0.0.1:{port}"
        check_answer(base, features, cfg, view, ids[0])
        if args.warmup > 0:
            load(base + "/get-online-features", features, ids, args.clients, args.warmup, args.batch, seed=1000)
        before = gunicorn_counts(log)
        load_start = loadavg()
        res = load(base + "/get-online-features", features, ids, args.clients, args.duration, args.batch, seed=0)
        after = gunicorn_counts(log)
    finally:
        stop(proc)
    return {"command": ["feast", *cmd[cmd.index("-c"):]], "startup_s": round(startup, 2), "loadavg_start": load_start,
            **res, "worker_boots": after["worker_boots"] - before["worker_boots"],
            "worker_recycled": after["recycled"] - before["recycled"], "log": str(log)}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"Feature server under load: {c['clients']} clients x {c['duration_s']} s per server, "
             f"127.0.0.1, {c['rows']} rows x {c['dim']}-d, {c['batch']} chip(s) per request, online store "
             f"{c['online']}; {result['machine']['cores_available']} cores, load {result['machine']['loadavg_start']}.",
             "", "| server | flags | requests | errors | p50 ms | p95 ms | p99 ms | max ms | p99 ms incl. failed | "
             "req/s | longest gap ms | workers recycled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("anchor", "sarflow"):
        s = result["servers"][name]
        flags = " ".join(s["command"][s["command"].index("serve") + 1:])
        flags = re.sub(r"--(host|port)=\S+ ?", "", flags).strip() or "(Feast's defaults)"
        lines.append(f"| {name} | `{flags}` | {s['requests']} | {s['errors']} ({100 * (s['error_rate'] or 0):.2f} %) | "
                     + " | ".join("-" if s[k] is None else f"{s[k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
                     + f" | {s['p99_all_ms']:.1f} | {s['throughput_rps']:.1f} | {s['longest_gap_ms']:.0f} | {s['worker_recycled']} |")
    r = result["ratios_sarflow_over_anchor"]
    lines += ["", "sarflow / anchor: " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 8; 4 with --quick)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load per server (default 20; 3 with --quick)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of load before the timed run (default 2; 0.5 with --quick)")
    ap.add_argument("--rows", type=int, default=None, help="chips materialized (default 10000; 500 with --quick)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="chips per request")
    ap.add_argument("--workers", type=int, default=None, help="sarflow's workers (default: sarflow.local.services.feast_workers)")
    ap.add_argument("--online", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--quick", action="store_true", help="a smoke of a few seconds")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results folder or a .json path")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "feature_server")
    args = ap.parse_args(argv)
    q = args.quick
    args.clients = args.clients or (4 if q else 8)
    args.duration = args.duration if args.duration is not None else (3.0 if q else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 2.0)
    args.rows = args.rows or (500 if q else 10_000)
    for flag, v in (("--clients", args.clients), ("--duration", args.duration), ("--rows", args.rows), ("--batch", args.batch)):
        if v <= 0:
            print(f"{flag} {v}: must be positive", file=sys.stderr)
            return 2
    out = args.out if args.out.suffix == ".json" else args.out / ("feature_server_quick.json" if q else "feature_server.json")
    workers = feast_workers(args.workers)

    start_load = loadavg()
    t = time.perf_counter()
    try:
        cfg, view, ids = build_root(args.work, args.rows, args.dim, args.online, args.redis)
    except InputError as e:
        print(f"bench_feature_server: {e}", file=sys.stderr)
        return 1
    build_s = time.perf_counter() - t
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "feast.cli.cli", "-c", str(cfg.repo), "serve", "--host=127.0.0.1", "--port={port}"]
    ours = feast_serve_command(cfg.repo, "127.0.0.1", 0, workers)
    ours = [a if not a.startswith("--port=") else "--port={port}" for a in ours]
    servers = {}
    try:
        servers["anchor"] = run_server("anchor", py, logs, args, cfg, view, ids)  # Feast's defaults
        servers["sarflow"] = run_server("sarflow", ours, logs, args, cfg, view, ids)
    finally:
        if args.online == "redis":
            open_feature_store(cfg).teardown()  # the project's keys out of the shared Redis
    a, s = servers["anchor"], servers["sarflow"]
    result = {
        "benchmark": "feature_server",
        "machine": {**host(), "loadavg_start": start_load, "loadavg_end": loadavg(), "feast": metadata.version("feast"),
                    "gunicorn": metadata.version("gunicorn"),
                    "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()},
        "config": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "rows": args.rows,
                   "dim": args.dim, "batch": args.batch, "online": args.online, "quick": q, "client": "requests.Session per client thread, keep-alive, timeout 10 s",
                   "sarflow_flags": feast_serve_flags(workers), "build_root_s": round(build_s, 2)},
        "anchor": "feast serve with Feast's default flags (1 worker, --max-requests 1000, --max-requests-jitter 50, access log on, registry TTL 60 s)",
        "servers": servers,
        "ratios_sarflow_over_anchor": {
            "p50": ratio(s["p50_ms"], a["p50_ms"]), "p95": ratio(s["p95_ms"], a["p95_ms"]),
            "p99": ratio(s["p99_ms"], a["p99_ms"]), "p99_all": ratio(s["p99_all_ms"], a["p99_all_ms"]),
            "throughput": ratio(s["throughput_rps"], a["throughput_rps"]),
            "error_rate": ratio(s["error_rate"], a["error_rate"])},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Embedding throughput: `sarflow.features.embed.embed_store` against the obvious loop it
replaced (the anchor), on the same store, encoder and device, side by side in one run.

1. Store: a synthetic scene (`sarflow.data.synth.synthesize`, --size-px, --chip-size) tiled with
   `sarflow.data.tile.tile` (library defaults), cached in benchmarks/work/ (gitignored); a rerun
   reuses it and reports the original build time with "cached": true.
2. Encoder: `sarflow.training.pretrain.pretrain` (MAE, one step on CPU, --vit size, --patch,
   input size = the store's chip size) registered in a temporary MLflow sqlite database as
   sarflow-encoder-mae v1. The weights do not matter for throughput.
3. Anchor, "obvious loop": embed_store's loop before the pipelining, verbatim: read a batch
   from zarr, forward (bf16 autocast on CUDA), `.cpu()` per batch; then the same Parquet table
   written the same way (temporary folder renamed into place).
4. Ours: `embed_store(..., overwrite=True)`, which reports its loop and write times.
5. Reader alone: embed_store's reader (`_chip_batches`) over the store with no encoder, the
   most the pipelined loop can do on this machine.

Both run --repeats times, alternating; the fastest run of each (loop + write) is reported,
every run is recorded. Before the timed runs every chip is read once (warm page cache) and one
batch goes through the encoder (CUDA context, kernels). Throughput is chips/s of the loop alone
and including the write; the issue's goal is >= 15,000 chips/s including the write for ViT-B
on one H100:

    .venv/bin/python benchmarks/bench_embed.py --device cuda --vit base --size-px 4096 --chip-size 64 --patch 8 \
        --batch-size 1024 --repeats 5

Writes OUT (default benchmarks/results/embed.json) and prints a table.

Reader scaling (issue 14: at least 1.8x chips/s from 1 to 2 reader workers): `--reader-scaling
t1,1,2` times only the chip reader (`_chip_batches`) in each configuration: `tN` in this
process with N threads (the anchor, what `embed.readers: 0` does), `N` with N reader processes
(`embed.readers: N`), over a store of `--reader-chips` chips of `--reader-bands` bands x
`--chip-size` px (the issue's figure: 2 x 448 px, M3LEO-like chips), written with the tiler's
array layout (one chip a chunk, shards of 64 chips, Blosc zstd-3 with shuffle, float32, smooth
fields plus speckle so it compresses like SAR backscatter). Per configuration: wall chips/s
(reader start-up included), seconds to the first batch, CPU seconds of the whole process tree
(this process, the forkserver and the readers, via psutil, taken after the last batch) and this
process's share, CPU ms per chip, and the ratios to the anchor and of 2 to 1 reader processes.
Before the timed runs every chip is read once (page cache) and each configuration reads two
batches (the readers' forkserver); then runs alternate, best of --repeats; the load average
(1, 5, 15 min) is recorded at start and end:

    .venv/bin/python benchmarks/bench_embed.py --reader-scaling t1,1,2 --chip-size 448 --batch-size 64 \
        --reader-chips 1024 --repeats 3 --out benchmarks/results/embed_reader_448.json

writes benchmarks/results/embed_reader.json (or OUT).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import host, loadavg  # benchmarks/machine.py, beside this script

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MODEL = "sarflow-encoder-mae"
GOAL_CHIPS_PER_S = 15_000  # ViT-B on one H100, including the Parquet write


def machine(device: str) -> dict:
    import torch
    import zarr

    info = {**host(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda, "gpu": None,
            "embed_py_sha256": hashlib.sha256((REPO / "src/sarflow/features/embed.py").read_bytes()).hexdigest()[:16],
            "loadavg_start": loadavg()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


# ------------------------------------------------------------------ store and encoder

def ensure_store(size: int, chip: int, seed: int, work: Path) -> tuple[Path, dict]:
    """The cached chip store for this scene size and chip size, built when absent."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile import TileOptions, tile

    d = work / f"embed_scene_{size}_c{chip}_seed{seed}"
    store, marker = d / "chips.zarr", d / "bench_store.json"
    if marker.is_file():
        return store, {**json.loads(marker.read_text()), "cached": True}
    shutil.rmtree(d, ignore_errors=True)
    print(f"building a {size} px scene with {chip} px chips in {d} ...", flush=True)
    t = time.perf_counter()
    catalog = synthesize(d / "scene", SynthConfig(size_px=size, seed=seed, chip_size=chip))
    synth_s = time.perf_counter() - t
    t = time.perf_counter()
    tile(load_catalog(catalog), store, TileOptions(), show_progress=False)
    info = {"store": str(store), "size_px": size, "chip_size": chip, "seed": seed,
            "synth_s": round(synth_s, 1), "tile_s": round(time.perf_counter() - t, 1)}
    marker.write_text(json.dumps(info, indent=1))
    return store, {**info, "cached": False}


def register_encoder(store: Path, tmp: Path, vit: str, patch: int, chip: int) -> dict:
    """A one-step MAE on CPU, registered as MODEL v1 in tmp/mlflow.db (MLflow left pointing there)."""
    from sarflow.training.methods import OptimConfig
    from sarflow.training.pretrain import PretrainConfig, pretrain
    from sarflow.training.vit import ViTConfig

    cfg = ViTConfig(size=vit, patch=patch, img_size=chip)
    t = time.perf_counter()
    pretrain(PretrainConfig(store=str(store), method="mae", vit=cfg, batch_size=8, accelerator="cpu", devices=1,
                            optim=OptimConfig(max_steps=1, warmup_steps=1),
                            tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"))
    dim, depth, heads = cfg.resolved()
    return {"size": vit, "patch": patch, "input_px": chip, "tokens": (chip // patch) ** 2 + 1, "dim": dim,
            "depth": depth, "heads": heads, "pretrain_s": round(time.perf_counter() - t, 1)}


# ------------------------------------------------------------------ the two contenders

def obvious_loop(store: str, encoder, device: str, batch_size: int, out: Path) -> tuple[np.ndarray, dict]:
    """The anchor: embed_store before the pipelining (read, forward, `.cpu()` per batch, then
    the same Parquet table written the same way); `encoder` is loaded and on `device`."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import shapely
    import torch

    from sarflow.data.paths import _write_table
    from sarflow.features.embed import encoder_arrays
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    group = open_chip_group(store)
    table = read_chip_table(store).sort_values("index")
    arrays = encoder_arrays(group, encoder, store)
    n = int(group.attrs["chips"])
    dataset_version = dataset_lineage(store)["sarflow.dataset_dvc_md5"]
    t0 = time.perf_counter()
    embeddings = []
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = np.concatenate([arr[start:stop][:, idx] for arr, idx in arrays], axis=1).astype(np.float32)
            e = encoder(torch.from_numpy(x).to(device)).float().cpu().numpy()
            embeddings.append(e)
    emb = np.concatenate(embeddings).astype(np.float32)
    loop_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    dim = emb.shape[1]
    centroids = shapely.centroid(shapely.from_wkb(table["geometry"].to_numpy()))
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    arrow = pa.table({
        "chip_id": pa.array(table["chip_id"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim).cast(pa.list_(pa.float32())),
        "model_name": pa.array([MODEL] * n, pa.string()),
        "model_version": pa.array(["1"] * n, pa.string()),
        "dataset_version": pa.array([dataset_version] * n, pa.string()),
        "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
        "lon": pa.array(shapely.get_x(centroids), pa.float64()),
        "lat": pa.array(shapely.get_y(centroids), pa.float64()),
        "split": pa.array(table["split"].tolist(), pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    _write_table(arrow, tmp / "part-00000.parquet", row_group_size=65536)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return emb, {"loop_s": loop_s, "write_s": time.perf_counter() - t1}


def throughput(runs: list[dict], n: int) -> dict:
    best = min(runs, key=lambda r: r["loop_s"] + r["write_s"])
    return {"loop_s": round(best["loop_s"], 4), "write_s": round(best["write_s"], 4),
            "chips_per_s_loop": round(n / best["loop_s"], 1),
            "chips_per_s_with_write": round(n / (best["loop_s"] + best["write_s"]), 1),
            "runs": [{k: round(v, 4) for k, v in r.items()} for r in runs]}


# ------------------------------------------------------------------ reader scaling

def reader_store(n: int, bands: int, chip: int, seed: int, work: Path) -> Path:
    """A cached zarr store laid out as the tiler writes one source (see the module doc)."""
    import zarr

    d = work / f"reader_{n}x{bands}x{chip}_seed{seed}.zarr"
    if (d / "zarr.json").is_file() and (d / ".complete").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    root = zarr.open_group(str(d), mode="w")
    arr = root.create_array("s1", shape=(n, bands, chip, chip), chunks=(1, bands, chip, chip),
                            shards=(64, bands, chip, chip), dtype="float32", fill_value=float("nan"),
                            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
    arr.attrs.update({"bands": [f"b{i}" for i in range(bands)], "nodata_in_store": "NaN"})
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:chip, 0:chip].astype(np.float32) / chip
    for s0 in range(0, n, 64):
        k = min(64, n - s0)
        phase = rng.uniform(0, 6.28, (k, bands, 1, 1)).astype(np.float32)
        field = np.sin(6 * xx + phase) * np.cos(4 * yy + phase)  # smooth backscatter-like field
        speckle = rng.gamma(4.0, 0.25, (k, bands, chip, chip)).astype(np.float32)  # multiplicative speckle
        arr[s0:s0 + k] = (10 * np.log10(np.exp(field) * speckle + 1e-3)).astype(np.float32)
    (d / ".complete").write_text("")
    return d


def reader_spec(token: str) -> tuple[int, int]:
    """`tN` -> (0 reader processes, N threads): the in-process reader; `N` -> (N processes, 1)."""
    token = token.strip()
    return (0, int(token[1:])) if token.startswith("t") else (int(token), 1)


def tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and every descendant alive now, by pid (the
    reader processes are children of the forkserver, itself a child of this process)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def timed_read(arrays, n: int, batch: int, readers: int, threads: int, store: str) -> dict:
    """One pass of the reader over the n chips: wall seconds, seconds to the first batch, and the
    CPU seconds of the whole process tree, taken after the last batch, before the readers stop."""
    from sarflow.features.embed import _chip_batches

    before = tree_cpu()
    t = time.perf_counter()
    batches = _chip_batches(arrays, n, batch, workers=threads, readers=readers, store=store)
    got, first = 0, None
    for x in batches:
        got += len(x)
        first = first if first is not None else time.perf_counter() - t
        if got == n:
            break
    wall = time.perf_counter() - t
    after = tree_cpu()
    batches.close()
    assert got == n, (got, n)
    me = os.getpid()
    cpu = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    parent = after[me] - before[me]
    return {"wall_s": round(wall, 4), "first_batch_s": round(first, 4), "cpu_s": round(cpu, 4),
            "cpu_parent_s": round(parent, 4), "cpu_readers_s": round(cpu - parent, 4)}


def reader_scaling(a, specs: list[str], out: Path) -> int:
    import zarr

    from sarflow.features.embed import READER_START

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = {**host(), "zarr": zarr.__version__, "numpy": np.__version__, "loadavg_start": list(os.getloadavg()),
            "embed_py_sha256": hashlib.sha256((REPO / "src/sarflow/features/embed.py").read_bytes()).hexdigest()[:16]}
    t = time.perf_counter()
    store = reader_store(a.reader_chips, a.reader_bands, a.chip_size, a.seed, work)
    build_s = time.perf_counter() - t
    arr = zarr.open_group(str(store), mode="r")["s1"]
    arrays, n = [(arr, list(range(a.reader_bands)))], a.reader_chips
    configs = {spec: reader_spec(spec) for spec in specs}
    timed_read(arrays, n, a.batch_size, 0, 1, str(store))  # every chip once: the page cache
    for readers, threads in dict.fromkeys(configs.values()):  # each configuration once (the readers' forkserver)
        timed_read(arrays, min(n, 2 * a.batch_size), a.batch_size, readers, threads, str(store))
    runs = {spec: [] for spec in specs}
    for _ in range(a.repeats):
        for spec, (readers, threads) in configs.items():
            runs[spec].append(timed_read(arrays, n, a.batch_size, readers, threads, str(store)))
    rows = {}
    for spec, (readers, threads) in configs.items():
        best = min(runs[spec], key=lambda r: r["wall_s"])
        rows[spec] = {"config": spec, "reader_processes": readers, "threads": threads if not readers else None,
                      "chips_per_s": round(n / best["wall_s"], 1), "wall_s": best["wall_s"],
                      "first_batch_s": best["first_batch_s"], "cpu_s": best["cpu_s"],
                      "cpu_parent_s": best["cpu_parent_s"], "cpu_readers_s": best["cpu_readers_s"],
                      "cpu_ms_per_chip": round(1000 * best["cpu_s"] / n, 3),
                      "cores_busy": round(best["cpu_s"] / best["wall_s"], 2), "runs": runs[spec]}
    anchor = rows[specs[0]]
    for r in rows.values():
        r["ratio_to_anchor"] = round(r["chips_per_s"] / anchor["chips_per_s"], 3)
        r["cpu_per_chip_ratio_to_anchor"] = round(r["cpu_ms_per_chip"] / anchor["cpu_ms_per_chip"], 3)
    ratios = {}
    if "1" in rows and "2" in rows:
        ratios = {"chips_per_s_2_vs_1_process": round(rows["2"]["chips_per_s"] / rows["1"]["chips_per_s"], 3),
                  "cpu_per_chip_2_vs_1_process": round(rows["2"]["cpu_ms_per_chip"] / rows["1"]["cpu_ms_per_chip"], 3)}
    result = {"benchmark": "embed reader scaling", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**info, "loadavg_end": list(os.getloadavg())},
              "config": {"chips": n, "bands": a.reader_bands, "chip_px": a.chip_size, "dtype": "float32",
                         "batch_size": a.batch_size, "repeats": a.repeats, "shard_chips": 64, "codec": "blosc zstd-3 shuffle",
                         "reader_start": READER_START,
                         "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
                         "store_build_s": round(build_s, 2)},
              "anchor": f"{specs[0]}: " + ("the in-process reader, %d thread(s)" % configs[specs[0]][1]
                                           if not configs[specs[0]][0] else "%d reader process(es)" % configs[specs[0]][0]),
              "results": list(rows.values()), "ratios": ratios,
              "goal": {"chips_per_s_2_vs_1_process": 1.8,
                       "met": bool(ratios) and ratios["chips_per_s_2_vs_1_process"] >= 1.8}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{n} chips of {a.reader_bands} x {a.chip_size} px float32, batch {a.batch_size}, best of {a.repeats}, "
          f"load average {info['loadavg_start']} -> {result['machine']['loadavg_end']}")
    print(f"{'config':>8}{'chips/s':>10}{'wall s':>9}{'1st s':>8}{'CPU s':>8}{'parent':>8}{'CPU ms/chip':>13}"
          f"{'cores':>7}{'ratio':>7}")
    for r in rows.values():
        print(f"{r['config']:>8}{r['chips_per_s']:>10.1f}{r['wall_s']:>9.3f}{r['first_batch_s']:>8.3f}{r['cpu_s']:>8.2f}"
              f"{r['cpu_parent_s']:>8.2f}{r['cpu_ms_per_chip']:>13.3f}{r['cores_busy']:>7.2f}{r['ratio_to_anchor']:>7.2f}")
    if ratios:
        print(f"2 vs 1 reader process: {ratios['chips_per_s_2_vs_1_process']:.2f}x chips/s (goal 1.8x), "
              f"{ratios['cpu_per_chip_2_vs_1_process']:.2f}x CPU per chip")
    print(f"results in {out}")
    return 0


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--vit", choices=["tiny", "small", "base"], default="tiny")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--size-px", type=int, default=1024, help="side of the synthetic scene")
    ap.add_argument("--chip-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (the fastest is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(HERE / "work"), help="cache of stores (gitignored)")
    ap.add_argument("--out", default=None, help="default results/embed.json (results/embed_reader.json with --reader-scaling)")
    ap.add_argument("--reader-scaling", default=None,
                    help="comma-separated reader configurations, the first the anchor: tN = in this process with N "
                         "threads, N = N reader processes; e.g. t1,1,2: time the reader only")
    ap.add_argument("--reader-chips", type=int, default=512)
    ap.add_argument("--reader-bands", type=int, default=2)
    a = ap.parse_args(argv)
    if a.reader_scaling:
        out = Path(a.out or HERE / "results" / "embed_reader.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        return reader_scaling(a, a.reader_scaling.split(","), out)
    a.out = a.out or str(HERE / "results" / "embed.json")

    import mlflow
    import torch

    from sarflow.features.embed import _chip_batches, embed_store, embedding_matrix, encoder_arrays, read_embeddings
    from sarflow.data.chipstore import open_chip_group

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store, store_info = ensure_store(a.size_px, a.chip_size, a.seed, work)
    group = open_chip_group(str(store))
    n = int(group.attrs["chips"])

    with tempfile.TemporaryDirectory(prefix="bench-embed-", dir=work) as tmp:
        tmp = Path(tmp)
        vit = register_encoder(store, tmp, a.vit, a.patch, a.chip_size)
        uri = f"models:/{MODEL}/1"
        encoder = mlflow.pytorch.load_model(uri, map_location="cpu").to(device).eval()
        arrays = encoder_arrays(group, encoder, str(store))
        t = time.perf_counter()
        for s in range(0, n, a.batch_size):  # warm up: the page cache, then the encoder on the device
            x = np.concatenate([arr[s:s + a.batch_size][:, idx] for arr, idx in arrays], axis=1).astype(np.float32)
        warm_read_s = time.perf_counter() - t
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            encoder(torch.from_numpy(x).to(device)).float().cpu()

        runs: dict[str, list] = {"anchor": [], "ours": []}
        for k in range(a.repeats):
            anchor_emb, r = obvious_loop(str(store), encoder, device, a.batch_size, tmp / "anchor" / "part")
            runs["anchor"].append(r)
            res = embed_store(str(store), uri, tmp / "ours", batch_size=a.batch_size, overwrite=True, device=device)
            runs["ours"].append({"loop_s": res["loop_s"], "write_s": res["write_s"]})
            print(f"run {k + 1}/{a.repeats}: anchor {r['loop_s']:.2f} + {r['write_s']:.2f} s, "
                  f"ours {res['loop_s']:.2f} + {res['write_s']:.2f} s", flush=True)
        ours_emb = embedding_matrix(read_embeddings(tmp / "ours", MODEL, "1"))
        read_s = []
        for _ in range(a.repeats):  # embed_store's reader alone: the most its loop can do
            t = time.perf_counter()
            for _batch in _chip_batches(arrays, n, a.batch_size, pin=device == "cuda"):
                pass
            read_s.append(time.perf_counter() - t)

    anchor, ours = throughput(runs["anchor"], n), throughput(runs["ours"], n)
    diff = float(np.abs(ours_emb - anchor_emb).max())
    result = {
        "benchmark": "embed", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "config": {"device": device, "dtype": "bfloat16 autocast" if device == "cuda" else "float32",
                   "batch_size": a.batch_size, "repeats": a.repeats, "chips": n, "channels": encoder.in_chans,
                   "embedding_dim": int(ours_emb.shape[1]), "vit": vit, "store": store_info,
                   "warm_read_s": round(warm_read_s, 3)},
        "anchor": {"name": "obvious loop: read batch from zarr, forward, .cpu() per batch, then the Parquet write",
                   **anchor},
        "ours": {"name": "sarflow.features.embed.embed_store", **ours},
        "reader_alone": {"name": "embed_store's reader (_chip_batches) with no encoder: the loop's upper bound",
                         "s": round(min(read_s), 4), "chips_per_s": round(n / min(read_s), 1),
                         "runs": [round(r, 4) for r in read_s]},
        "ratios": {"loop": round(ours["chips_per_s_loop"] / anchor["chips_per_s_loop"], 3),
                   "with_write": round(ours["chips_per_s_with_write"] / anchor["chips_per_s_with_write"], 3)},
        "embeddings_max_abs_diff": diff,
        "goal": {"chips_per_s_with_write": GOAL_CHIPS_PER_S, "for": "ViT-B on one H100",
                 "met": ours["chips_per_s_with_write"] >= GOAL_CHIPS_PER_S},
    }
    result["machine"]["loadavg_end"] = loadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{n} chips of {a.chip_size} px, ViT-{a.vit} patch {a.patch} ({vit['tokens']} tokens, dim {vit['dim']}), "
          f"batch {a.batch_size}, {device}{' ' + result['machine']['gpu'] if result['machine']['gpu'] else ''}, "
          f"{result['config']['dtype']}, best of {a.repeats}")
    print(f"{'':<24}{'loop s':>9}{'write s':>9}{'chips/s loop':>14}{'chips/s +write':>16}")
    for name, r in (("obvious loop (anchor)", anchor), ("embed_store (ours)", ours)):
        print(f"{name:<24}{r['loop_s']:>9.3f}{r['write_s']:>9.3f}{r['chips_per_s_loop']:>14.1f}"
              f"{r['chips_per_s_with_write']:>16.1f}")
    print(f"{'reader alone':<24}{min(read_s):>9.3f}{'':>9}{result['reader_alone']['chips_per_s']:>14.1f}")
    print(f"{'ratio ours / anchor':<24}{'':>18}{result['ratios']['loop']:>14.2f}{result['ratios']['with_write']:>16.2f}")
    print(f"max |ours - anchor| = {diff:.3g}; goal {GOAL_CHIPS_PER_S} chips/s with write (ViT-B, H100): "
          f"{'met' if result['goal']['met'] else 'not met'} here; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

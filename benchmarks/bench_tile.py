#!/usr/bin/env python
"""Benchmark of `sarflow tile` against named anchors, side by side in one run.

For every scene size (pixels per side at 10 m) it:
  1. generates (or reuses, cached under benchmarks/work/) a synthetic scene with
     `sarflow synth DIR --size N --chip-size 256` (timed separately, not compared);
  2. runs `sarflow tile CATALOG --out STORE --overwrite --quiet` as a child process and
     measures wall time, peak RSS of the child (wait4 rusage, plus psutil sampling),
     CPU time, chips written and chips/s; then the same with `--no-checksum`;
  3. anchor `gdalwarp`: GDAL's command-line tool, once per source file, sequentially, with
     default options, onto exactly the store's grid (the store's `crs_wkt`, `-tr` its
     resolution, `-te` the full extent of the chips in chips.parquet, and the resampling
     recorded per file in each array's `resampling` attribute), uncompressed GTiff;
  4. anchor `torchgeo` (only with --torchgeo-python): benchmarks/torchgeo_tile.py in that
     interpreter (RasterDataset per source, IntersectionDataset, GridGeoSampler, zarr);
  5. inspects the store: bytes vs raw input bytes, files, files per chip (per array);
  6. the tiler in this process (plan / units / finalize, CPU seconds of each) and the anchor
     "floor" of this design: (a) every input file warped once over the chips' whole grid with
     GDAL (rasterio.warp.reproject, same resampling, dB sources in linear power, as many threads
     as the tiler's workers) + (b) every chip of every array encoded with the store's own Blosc
     codec; CPU seconds (getrusage) of each part.

Every scene size is run at each chip size of --chip-sizes (e.g. 64,256). Results go to
OUT/tile.json (OUT defaults to benchmarks/results) and two compact tables are printed. Goals
checked: sarflow/gdalwarp <= 2; peak RSS <= 1.5 GB at the largest size and flat across sizes;
files per chip per array <= 1/64; sarflow tile's CPU seconds <= 1.2x the floor; torchgeo's CPU
per unique chip position >= 3x sarflow's per chip (torchgeo from the recorded run
results/tile_vs_torchgeo.json unless --torchgeo-python is given). The M3LEO projection (10M
chips of 448 px, N one-core workers) uses benchmarks/cost.py, shared with bench_scale.py.

The child processes run with the work folder as their working directory, so the
repository's params.yaml is NOT read: the scene and the tiler use the library defaults
(SynthConfig / TileOptions), recorded in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cost import M3LEO_CHIP_PX, M3LEO_CHIPS, m3leo_hours  # benchmarks/cost.py, beside this script
from machine import cpu_model, loadavg  # benchmarks/machine.py, beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GB = 1 << 30
MB = 1 << 20
GOAL_RATIO_GDALWARP = 2.0
GOAL_RSS_BYTES = int(1.5 * 1e9)  # 1.5 GB
GOAL_RSS_FLAT = 1.25  # largest / smallest size; "flat" means within 25 %
GOAL_FILES_PER_CHIP_PER_ARRAY = 1 / 64
GOAL_FLOOR = 1.2  # sarflow tile CPU seconds / (warp every input once + encode every chip)
GOAL_TORCHGEO = 3.0  # torchgeo's CPU per unique chip position / sarflow's CPU per chip
CLI_RESAMPLING = {"nearest": "near"}  # store attribute name -> gdalwarp -r name


# ---------------------------------------------------------------- running children

def sarflow_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "sarflow"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "sarflow.cli.main"]


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _vm_hwm_bytes(pid: int) -> int:
    """The peak RSS of a running process since its exec (/proc/PID/status VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], cwd: Path, log_stem: Path, timeout: float, sample_s: float = 0.25,
                 env: dict | None = None) -> dict:
    """Runs `cmd`, waits for it with wait4 (its own rusage: CPU) while a thread samples the RSS of it
    and its descendants with psutil, and its peak RSS (VmHWM, the high-water mark of its own memory
    since exec, so spikes between samples count). stdout/stderr go to log_stem.{out,err}.

    wait4's ru_maxrss is not the child's peak: Linux folds the high-water mark of the memory the child
    had before exec, this process's own (vfork), into it, so a child of a 1.5 GB benchmark process
    reports 1.5 GB even for /bin/true. It is kept as `ru_maxrss_bytes` for reference only."""
    import psutil

    log_stem.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, int]] = []
    hwm = [0]
    stop = threading.Event()
    load0, busy0 = loadavg(), _cpu_busy_s()
    with open(log_stem.with_suffix(".out"), "w") as out, open(log_stem.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=err, env=env)

        def poll() -> None:
            try:
                ps = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not stop.is_set():
                hwm[0] = max(hwm[0], _vm_hwm_bytes(proc.pid))
                try:
                    rss = ps.memory_info().rss
                    for child in ps.children(recursive=True):
                        try:
                            rss += child.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    break
                samples.append((round(time.perf_counter() - t0, 3), rss))
                stop.wait(sample_s)

        sampler = threading.Thread(target=poll, daemon=True)
        sampler.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    busy1 = _cpu_busy_s()
    # CPU that other processes used meanwhile (our own sampler thread is negligible): the
    # machine is shared, so a wall time is only comparable with others taken at similar load
    other = (busy1 - busy0 - cpu) / wall if busy0 is not None and busy1 is not None and wall > 0 else None
    return {
        "cmd": [str(c) for c in cmd],
        "rc": proc.returncode,
        "timed_out": wall >= timeout,
        "wall_s": round(wall, 3),
        "cpu_user_s": round(ru.ru_utime, 3),
        "cpu_sys_s": round(ru.ru_stime, 3),
        "cpu_s": round(cpu, 3),
        "cpu_util_cores": round(cpu / wall, 2) if wall > 0 else None,
        "other_processes_cores": round(max(other, 0.0), 2) if other is not None else None,
        "loadavg_1min_at_start": load0,
        "peak_rss_bytes": max(hwm[0], max((r for _, r in samples), default=0)),
        "peak_rss_sampled_bytes": max((r for _, r in samples), default=0),
        "ru_maxrss_bytes": int(ru.ru_maxrss) * 1024,  # Linux: KiB; includes this process's RSS (see above)
        "rss_timeline": _thin(samples, 120),
        "log": str(log_stem.with_suffix(".err")),
    }


def _thin(samples: list, n: int) -> list:
    if len(samples) <= n:
        return [[t, r] for t, r in samples]
    step = len(samples) / n
    return [list(samples[int(i * step)]) for i in range(n)] + [list(samples[-1])]


def _check(result: dict, what: str) -> None:
    if result["rc"] != 0:
        tail = ""
        try:
            tail = Path(result["log"]).read_text()[-3000:]
        except OSError:
            pass
        raise SystemExit(f"{what} failed (rc={result['rc']}, timed out: {result['timed_out']}):\n"
                         f"{' '.join(result['cmd'])}\n{tail}")


# ---------------------------------------------------------------- scene

def ensure_scene(size: int, chip: int, seed: int, work: Path, timeout: float) -> tuple[Path, dict]:
    """The cached scene for this size, generated with the CLI when absent."""
    d = work / f"scene_{size}_c{chip}_seed{seed}"
    catalog, marker = d / "catalog.yaml", d / "bench_scene.json"
    if catalog.is_file() and marker.is_file():
        info = json.loads(marker.read_text())
        info["cached"] = True
        return catalog, info
    shutil.rmtree(d, ignore_errors=True)
    print(f"[{size}] generating scene in {d} ...", flush=True)
    r = run_measured(sarflow_cmd() + ["synth", d, "--size", size, "--chip-size", chip, "--seed", seed], cwd=work,
                     log_stem=work / "logs" / f"synth_{size}", timeout=timeout)
    _check(r, f"sarflow synth --size {size}")
    info = {"dir": str(d), "size_px": size, "chip_size": chip, "seed": seed, "generation_s": r["wall_s"],
            "generation_peak_rss_bytes": r["peak_rss_bytes"], "generated_at": _now()}
    marker.write_text(json.dumps(info, indent=1))
    info["cached"] = False
    return catalog, info


def catalog_inputs(catalog: Path) -> list[Path]:
    import yaml

    cat = yaml.safe_load(catalog.read_text())
    out = []
    for s in cat["sources"]:
        for u in s.get("uris") or []:
            for v in (u if isinstance(u, list) else [u]):
                p = (catalog.parent / v).resolve()
                if p not in out:
                    out.append(p)
    return out


def warm_read(paths: list[Path]) -> tuple[float, float]:
    """Reads every input once, so every timed run sees the same (warm) page cache, and hashes it
    like sarflow does (sha256, 8 MiB reads): (read seconds, sha256 seconds, both warm)."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass
    t1 = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return t1 - t0, time.perf_counter() - t1


# ---------------------------------------------------------------- sarflow tile

LOOP_RE = re.compile(r"wrote (\d+) chips to .* in ([0-9.]+)s")


def run_sarflow(catalog: Path, store: Path, work: Path, tag: str, extra: list[str], timeout: float,
                env_extra: dict | None = None, repeat: int = 1) -> dict:
    """The best (lowest wall) of `repeat` runs; every wall is kept in `walls_s`."""
    env = dict(os.environ, **env_extra) if env_extra else None
    runs = []
    for k in range(repeat):
        for p in (store, store.with_name(store.name + ".partial"), store.with_name(store.name + ".replaced")):
            shutil.rmtree(p, ignore_errors=True)  # no resume, no replace: every run does the same work
        r = run_measured(sarflow_cmd() + ["tile", catalog, "--out", store, "--overwrite", "--quiet", *extra],
                         cwd=work, log_stem=work / "logs" / f"tile_{tag}_{k}", timeout=timeout, env=env)
        _check(r, f"sarflow tile ({tag})")
        runs.append(r)
    r = min(runs, key=lambda x: x["wall_s"])
    r["walls_s"] = [x["wall_s"] for x in runs]
    if env_extra:
        r["env"] = env_extra
    chips = read_store_attrs(store)["chips"]
    r["chips"] = int(chips)
    r["chips_per_s"] = round(chips / r["wall_s"], 2)
    m = LOOP_RE.search(Path(r["log"]).read_text())
    if m:  # the tiler logs the time of its warp/write loop; the rest is startup, ingest (sha256), finalize
        r["loop_s"] = float(m.group(2))
        r["outside_loop_s"] = round(r["wall_s"] - r["loop_s"], 3)
    return r


def read_store_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def array_attrs(store: Path, name: str) -> dict:
    return json.loads((store / name / "zarr.json").read_text())


def inspect_store(store: Path, input_bytes: int, shard_chips: int) -> dict:
    attrs = read_store_attrs(store)
    chips = int(attrs["chips"])
    expected_shards = -(-chips // shard_chips)
    files = [p for p in store.rglob("*") if p.is_file()]
    apparent = sum(p.stat().st_size for p in files)
    disk = sum(p.stat().st_blocks * 512 for p in files)
    arrays = {}
    for name in attrs["modalities"]:
        meta = array_attrs(store, name)
        mine = [p for p in files if p.is_relative_to(store / name)]
        shards = [p for p in mine if p.name != "zarr.json"]
        arrays[name] = {
            "files": len(mine),
            "shard_files": len(shards),
            "bytes": sum(p.stat().st_size for p in mine),
            "dtype": meta.get("data_type"),
            "shape": meta.get("shape"),
            "files_per_chip": round(len(mine) / chips, 6),
            "shard_files_per_chip": round(len(shards) / chips, 6),
            "chips_per_shard_file": round(chips / len(shards), 2) if shards else None,
        }
    worst = max(arrays.values(), key=lambda a: a["files_per_chip"])
    return {
        "chips": chips,
        "bytes": apparent,
        "disk_bytes": disk,
        "input_bytes": input_bytes,
        "bytes_over_input": round(apparent / input_bytes, 4) if input_bytes else None,
        "files": len(files),
        "files_per_chip": round(len(files) / chips, 6),
        "max_files_per_chip_per_array": worst["files_per_chip"],
        "max_shard_files_per_chip_per_array": max(a["shard_files_per_chip"] for a in arrays.values()),
        "shard_chips": shard_chips,
        "shard_files_expected_per_array": expected_shards,
        # the layout behind the 1/64 goal: ceil(chips / 64) shard files per array, nothing more
        "shard_layout_ok": all(a["shard_files"] <= expected_shards for a in arrays.values()),
        "arrays": arrays,
    }


def _resolve(uri: str, base: Path) -> str:
    """A URI as the store records it (absolute, or relative to the catalog folder) as a path."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def store_inputs(store: Path, catalog: Path) -> tuple[dict[str, int], list[dict]]:
    """(uri -> size) of the inputs as the store records them, and per file its array and resampling;
    URIs resolved against the catalog's folder."""
    attrs = read_store_attrs(store)
    base = catalog.resolve().parent
    sizes, plan = {}, []
    for name in attrs["modalities"]:
        a = array_attrs(store, name)["attributes"]
        for s in a["sources"]:
            sizes[_resolve(s["uri"], base)] = int(s["size"])
        for uri, method in a["resampling"].items():
            path = _resolve(uri, base)
            if "://" not in path and not Path(path).is_file():
                raise SystemExit(f"input {uri!r} recorded in {store / name} not found as {path}")
            plan.append({"array": name, "uri": path, "resampling": method, "bands": len(a["bands"]),
                         "kind": a["kind"]})
    return sizes, plan


def chip_extent(store: Path) -> tuple[float, float, float, float]:
    import pyarrow.parquet as pq

    t = pq.read_table(store / "chips.parquet", columns=["minx", "miny", "maxx", "maxy"]).to_pydict()
    return min(t["minx"]), min(t["miny"]), max(t["maxx"]), max(t["maxy"])


# ---------------------------------------------------------------- gdalwarp anchor

def run_gdalwarp(store: Path, catalog: Path, work: Path, tag: str, timeout: float, multithread: bool = False,
                 repeat: int = 1) -> dict:
    attrs = read_store_attrs(store)
    wkt, res = attrs["crs_wkt"], float(attrs["resolution"])
    extent = chip_extent(store)
    _, plan = store_inputs(store, catalog)
    runs = []
    with tempfile.TemporaryDirectory(dir=work, prefix=f"gdalwarp_{tag}_") as tmp:
        for i, item in enumerate(plan):
            out = Path(tmp) / f"{i:02d}_{item['array']}.tif"
            method = CLI_RESAMPLING.get(item["resampling"], item["resampling"])
            cmd = ["gdalwarp", "-q", "-overwrite", "-t_srs", wkt, "-tr", repr(res), repr(res),
                   "-te", *[repr(float(v)) for v in extent], "-r", method, "-of", "GTiff"]
            if multithread:
                cmd += ["-multi", "-wo", "NUM_THREADS=ALL_CPUS"]
            tries = []
            for k in range(repeat):
                r = run_measured(cmd + [item["uri"], out], cwd=work,
                                 log_stem=work / "logs" / f"gdalwarp_{tag}_{i:02d}_{k}", timeout=timeout)
                _check(r, "gdalwarp")
                r["out_bytes"] = out.stat().st_size
                out.unlink()  # not timed; keeps the disk footprint to one output at a time
                tries.append(r)
            r = min(tries, key=lambda x: x["wall_s"])
            runs.append({"array": item["array"], "file": Path(item["uri"]).name, "resampling": method,
                         "wall_s": r["wall_s"], "walls_s": [x["wall_s"] for x in tries], "cpu_s": r["cpu_s"],
                         "cpu_util_cores": r["cpu_util_cores"], "other_processes_cores": r["other_processes_cores"],
                         "peak_rss_bytes": r["peak_rss_bytes"], "out_bytes": r["out_bytes"]})
    width = round((extent[2] - extent[0]) / res)
    height = round((extent[3] - extent[1]) / res)
    return {
        "options": "multithreaded: -multi -wo NUM_THREADS=ALL_CPUS" if multithread else "defaults (single thread)",
        "gdal_version": _gdalwarp_version(),
        "grid": {"crs_wkt_sha256": hashlib.sha256(wkt.encode()).hexdigest()[:16], "resolution": res,
                 "extent": list(extent), "width": width, "height": height},
        "files": runs,
        "wall_s": round(sum(r["wall_s"] for r in runs), 3),
        "cpu_s": round(sum(r["cpu_s"] for r in runs), 3),
        "other_processes_cores_mean": _mean([r["other_processes_cores"] for r in runs]),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "out_bytes": sum(r["out_bytes"] for r in runs),
    }


# ---------------------------------------------------------------- the floor of this design, and the tiler in-process

BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # zarr's names -> numcodecs' numbers


def store_grid(store: Path) -> tuple[str, float, "Affine", int, int]:
    """(crs_wkt, resolution, transform, width, height) of the raster spanning every chip of the store."""
    from affine import Affine

    attrs = read_store_attrs(store)
    res = float(attrs["resolution"])
    minx, miny, maxx, maxy = chip_extent(store)
    return attrs["crs_wkt"], res, Affine(res, 0.0, minx, 0.0, -res, maxy), round((maxx - minx) / res), \
        round((maxy - miny) / res)


def floor_warp(store: Path, catalog: Path, threads: int) -> dict:
    """Part (a) of the floor: every input file of every source warped ONCE onto the whole grid the
    chips span (rasterio.warp.reproject, GDAL's warper with NUM_THREADS = the tiler's worker threads),
    with the resampling the store records per file and the tiler's rule for dB sources (warped in
    linear power through the same dB2pow VRT, converted back to dB in the store's dtype). Nothing is
    mosaicked, cut or written. CPU seconds of this process (getrusage) around the warping only."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    from cost import cpu_seconds
    from sarflow.data.catalog import load_catalog
    from sarflow.data.ingest import gdal_env, ingest
    from sarflow.data.tile import LINEAR_POWER, _linear_power_vrt, _power_to_db, resampling_domain

    from affine import Affine

    ing = ingest(load_catalog(catalog), checksum=False)
    wkt, _, grid_transform, grid_width, grid_height = store_grid(store)
    files, cpu, wall, pixels = [], 0.0, 0.0, 0
    with gdal_env([u for s in ing.sources for u in s.files]):  # GDAL's block cache as the tiler's
        for s in ing.sources:
            attrs = array_attrs(store, s.name)["attributes"]
            methods = attrs["resampling"]
            k = int(attrs.get("store_factor") or 1)  # a source stored at k x the grid's pixel size: warped at that
            transform, width, height = grid_transform * Affine.scale(k), grid_width // k, grid_height // k
            linear = resampling_domain(s) == LINEAR_POWER
            for item in s.items:
                for uri, bands in item:
                    f = s.files[uri]
                    method = methods[ing.catalog.relative(uri)]
                    src_nodata = s.nodata
                    if src_nodata is None and np.dtype(s.dtype).kind == "f":
                        src_nodata = float("nan")
                    with rasterio.open(f.path) as raw:
                        opened = rasterio.open(_linear_power_vrt(raw, src_nodata)) if linear else raw
                        try:
                            dtype, nodata = ("float64", float("nan")) if linear else (s.dtype, s.fill_value)
                            dst = np.full((len(bands), height, width), nodata, dtype=dtype)
                            w0, c0 = time.perf_counter(), cpu_seconds()
                            reproject(rasterio.band(opened, list(range(1, len(bands) + 1))), dst,
                                      src_nodata=float("nan") if linear else src_nodata, dst_nodata=nodata,
                                      dst_transform=transform, dst_crs=wkt, resampling=Resampling[method],
                                      num_threads=threads)
                            if linear:
                                dst = _power_to_db(dst, s)
                            c1, w1 = cpu_seconds(), time.perf_counter()
                        finally:
                            if opened is not raw:
                                opened.close()
                    del dst
                    cpu += c1 - c0
                    wall += w1 - w0
                    pixels += len(bands) * width * height
                    files.append({"array": s.name, "file": Path(f.path).name, "resampling": method,
                                  "linear_power": linear, "bands": len(bands), "store_factor": k,
                                  "cpu_s": round(c1 - c0, 3), "wall_s": round(w1 - w0, 3)})
    return {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "threads": threads, "width": grid_width,
            "height": grid_height, "band_pixels": pixels, "files": files}


def floor_encode(store: Path, threads: int) -> dict:
    """Part (b) of the floor: every chip of every array of the store encoded with the array's own
    codec (the Blosc configuration zarr records: cname, clevel, shuffle, typesize, blocksize) on the
    same chunk bytes, in `threads` threads (Blosc's own threads off). The chips are read back from the
    store shard by shard (decoding not timed); CPU seconds of the encoding only."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs.blosc
    import numpy as np
    import zarr
    from numcodecs import Blosc

    from cost import cpu_seconds

    numcodecs.blosc.use_threads = False
    root = zarr.open_group(store, mode="r")
    chips = int(read_store_attrs(store)["chips"])
    arrays, cpu, wall, raw, encoded = {}, 0.0, 0.0, 0, 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for name in read_store_attrs(store)["modalities"]:
            arr = root[name]
            cfg = arr.compressors[0].to_dict()["configuration"]
            codec = Blosc.from_config({"cname": cfg["cname"], "clevel": cfg["clevel"],
                                       "shuffle": BLOSC_SHUFFLE[cfg["shuffle"]], "blocksize": cfg["blocksize"],
                                       "typesize": cfg.get("typesize") or arr.dtype.itemsize})
            step = arr.shards[0] if arr.shards else arr.chunks[0]
            a_cpu = a_raw = a_enc = 0
            for start in range(0, chips, step):
                data = np.ascontiguousarray(arr[start:min(start + step, chips)])
                chunks = [data[i].tobytes() for i in range(len(data))]  # zarr's bytes codec: C order, little endian
                w0, c0 = time.perf_counter(), cpu_seconds()
                out = list(pool.map(codec.encode, chunks))
                c1, w1 = cpu_seconds(), time.perf_counter()
                a_cpu += c1 - c0
                wall += w1 - w0
                a_raw += sum(len(c) for c in chunks)
                a_enc += sum(len(o) for o in out)
            arrays[name] = {"codec": {k: cfg[k] for k in ("cname", "clevel", "shuffle") if k in cfg},
                            "cpu_s": round(a_cpu, 3), "raw_bytes": a_raw, "encoded_bytes": a_enc}
            cpu, raw, encoded = cpu + a_cpu, raw + a_raw, encoded + a_enc
    return {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "threads": threads, "chips": chips,
            "raw_bytes": raw, "encoded_bytes": encoded, "arrays": arrays}


def run_floor(store: Path, catalog: Path, threads: int) -> dict:
    """The floor of this design: (a) warp every input once over the grid + (b) encode every chip."""
    load0 = os.getloadavg()
    warp = floor_warp(store, catalog, threads)
    enc = floor_encode(store, threads)
    chips = enc["chips"]
    cpu = warp["cpu_s"] + enc["cpu_s"]
    return {"cpu_s": round(cpu, 3), "warp": warp, "encode": enc, "chips": chips,
            "chips_per_cpu_s": round(chips / cpu, 2) if cpu else None,
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()}


def run_library(catalog: Path, store: Path, workers: int) -> dict:
    """sarflow's tiler in this process (library defaults, --no-checksum), each step's CPU seconds
    (getrusage, this process's threads): plan (ingest, the grid, the kept chips from the required
    sources' pixels, warping only the blocks of chips those do not settle, which it hands to the
    units as tile() does), the units (warp, cut, encode, write), finalize. No interpreter start-up."""
    from cost import cpu_seconds
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions
    from sarflow.data.tile_units import finalize, plan, run_units

    for p in (store, store.with_name(store.name + ".partial"), store.with_name(store.name + ".replaced")):
        shutil.rmtree(p, ignore_errors=True)
    options = TileOptions(workers=workers, checksum=False, overwrite=True)
    steps, load0 = {}, os.getloadavg()

    def step(name, fn):
        w0, c0 = time.perf_counter(), cpu_seconds()
        out = fn()
        steps[name] = {"cpu_s": round(cpu_seconds() - c0, 3), "wall_s": round(time.perf_counter() - w0, 3)}
        return out

    p = step("plan", lambda: plan(load_catalog(catalog), store, options, hand_over=True))
    step("units", lambda: run_units(store, workers=workers))
    step("finalize", lambda: finalize(store))
    cpu = sum(s["cpu_s"] for s in steps.values())
    return {"workers": workers, "checksum": False, "chips": p.total, "units": len(p.units), "steps": steps,
            "cpu_s": round(cpu, 3), "wall_s": round(sum(s["wall_s"] for s in steps.values()), 3),
            "chips_per_cpu_s": round(p.total / cpu, 2) if cpu else None,
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()}


def coarse_catalog(catalog: Path) -> tuple[Path, dict]:
    """A copy of the catalog (same folder, so its paths resolve alike) in which every source coarser
    than the grid gets `store_resolution`: the grid resolution times the largest k dividing the chip
    size (and the stride) with k x resolution no finer than the source's own pixel size. Returns the
    copy and {source: store_resolution}; ({} when no source is coarse)."""
    import yaml

    from sarflow.data.catalog import load_catalog
    from sarflow.data.ingest import ingest
    from sarflow.data.tile import resolution_in_grid

    ing = ingest(load_catalog(catalog), checksum=False)
    g = ing.grid
    ks = [k for k in range(1, g.chip_size + 1) if g.chip_size % k == 0 and g.stride % k == 0]
    chosen = {}
    for s in ing.sources:
        native = min(resolution_in_grid(f, g) for f in s.files.values())
        k = max((k for k in ks if k * g.resolution <= native * 1.0001), default=1)
        if k > 1:
            chosen[s.name] = k * g.resolution
    cat = yaml.safe_load(catalog.read_text())
    for src in cat["sources"]:
        if src["name"] in chosen:
            src["store_resolution"] = chosen[src["name"]]
    out = catalog.with_name(catalog.stem + "_coarse.yaml")
    out.write_text(yaml.safe_dump(cat, sort_keys=False))
    return out, chosen


def run_coarse(catalog: Path, work: Path, tag: str, full: dict, timeout: float, threads: int) -> dict:
    """`sarflow tile` (defaults, as the full-resolution run) on the catalog whose coarse sources are
    stored coarse, and the floor of that store: what storing coarse sources coarse saves."""
    variant, chosen = coarse_catalog(catalog)
    if not chosen:
        return {"skipped": "no source is coarser than the grid"}
    store = work / f"store_{tag}_coarse.zarr"
    r = run_sarflow(variant, store, work, f"{tag}_coarse", [], timeout)
    lib_store = work / f"store_{tag}_coarse_library.zarr"
    lib = run_library(variant, lib_store, threads)
    shutil.rmtree(lib_store, ignore_errors=True)
    fl = run_floor(store, variant, threads)
    sizes, _ = store_inputs(store, variant)
    st = inspect_store(store, sum(sizes.values()), tile_defaults()["shard_chips"])
    shutil.rmtree(store, ignore_errors=True)
    return {"catalog": str(variant), "store_resolution": chosen, "sarflow": r, "sarflow_library": lib, "floor": fl,
            "store_bytes": st["bytes"], "store_bytes_full_resolution": full["store"]["bytes"],
            "ratios": {"sarflow_cpu_over_floor": _ratio(r["cpu_s"], fl["cpu_s"]),
                       "library_cpu_over_floor": _ratio(lib["cpu_s"], fl["cpu_s"]),
                       "units_cpu_over_floor": _ratio(lib["steps"]["units"]["cpu_s"], fl["cpu_s"]),
                       "library_cpu_over_full_resolution_library_cpu": _ratio(lib["cpu_s"], full["sarflow_library"]["cpu_s"]),
                       "sarflow_cpu_over_full_resolution_cpu": _ratio(r["cpu_s"], full["sarflow"]["cpu_s"]),
                       "floor_over_full_resolution_floor": _ratio(fl["cpu_s"], full["floor"]["cpu_s"]),
                       "store_bytes_over_full_resolution": _ratio(st["bytes"], full["store"]["bytes"])},
            "chips_per_cpu_s": {"sarflow": _per(r["chips"], r["cpu_s"]), "library": _per(lib["chips"], lib["cpu_s"]),
                                "floor": _per(fl["chips"], fl["cpu_s"])},
            "m3leo_hours": {"library": m3leo_hours(lib["cpu_s"] / lib["chips"], full["chip_size"]),
                            "floor": m3leo_hours(fl["cpu_s"] / fl["chips"], full["chip_size"])}}


def recorded_torchgeo(size: int, chip: int) -> dict | None:
    """torchgeo's figures from the recorded run (results/tile_vs_torchgeo.json, same scene size and
    chip size): torchgeo needs its own ~5.5 GB environment, not installed here. Its CPU seconds are
    wall x cpu_util_cores as recorded (the whole child: imports, its DataLoader workers, the zarr write)."""
    path = HERE / "results" / "tile_vs_torchgeo.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    for s in rec.get("sizes", []):
        tg = s.get("torchgeo") or {}
        if s.get("size_px") == size and rec.get("config", {}).get("chip_size") == chip and "wall_s" in tg:
            cpu = tg["wall_s"] * tg["cpu_util_cores"]
            unique = tg.get("unique_chip_positions") or tg["chips"]
            return {"source": str(path.relative_to(REPO)), "recorded_at": rec.get("started_at"),
                    "git_commit": rec.get("machine", {}).get("git_commit"), "torchgeo": tg.get("torchgeo"),
                    "wall_s": tg["wall_s"], "cpu_util_cores": tg["cpu_util_cores"], "cpu_s": round(cpu, 2),
                    "import_s": tg.get("import_s"), "chips": tg["chips"], "unique_chip_positions": unique,
                    "cpu_s_per_unique_chip": round(cpu / unique, 4),
                    "sarflow_then": {"chips": s["sarflow"]["chips"], "cpu_s": s["sarflow"]["cpu_s"],
                                     "loadavg_1min_at_start": s["sarflow"].get("loadavg_1min_at_start")},
                    # both measured in that run, at the same load: the like-for-like ratio
                    "cpu_per_unique_chip_over_sarflow_then_per_chip": round(
                        cpu / unique / (s["sarflow"]["cpu_s"] / s["sarflow"]["chips"]), 3)}
    return None


# ---------------------------------------------------------------- torchgeo anchor

def run_torchgeo(python: str | None, store: Path, catalog: Path, work: Path, tag: str, workers: int,
                 timeout: float) -> dict:
    if not python:
        return {"skipped": "no --torchgeo-python given: torchgeo 0.8.1 needs its own ~5.5 GB environment, "
                           "which is not installed here (see benchmarks/README.md)"}
    if not Path(python).exists() and not shutil.which(python):
        return {"skipped": f"--torchgeo-python {python} does not exist"}
    import rasterio

    attrs = read_store_attrs(store)
    _, plan = store_inputs(store, catalog)
    sources: dict[str, dict] = {}
    for item in plan:
        a = array_attrs(store, item["array"])
        s = sources.setdefault(item["array"], {
            "name": item["array"], "files": [], "bands": item["bands"], "kind": item["kind"],
            "resampling": item["resampling"], "dtype": a["data_type"], "stacked": False})
        s["files"].append(item["uri"])
        with rasterio.open(item["uri"]) as ds:
            if ds.count != item["bands"]:
                s["stacked"] = True  # single-band files stacked into bands: not in the torchgeo pattern here
    spec = {"crs_wkt": attrs["crs_wkt"], "resolution": float(attrs["resolution"]), "chip_size": int(attrs["chip_size"]),
            "stride": int(attrs["chip_size"]) - int(attrs.get("overlap", 0)), "roi": list(chip_extent(store)),
            "sources": list(sources.values())}
    spec_path = work / f"torchgeo_spec_{tag}.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_store = work / f"torchgeo_{tag}.zarr"
    result_path = work / f"torchgeo_result_{tag}.json"
    shutil.rmtree(out_store, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    r = run_measured([python, HERE / "torchgeo_tile.py", "--spec", spec_path, "--out", out_store,
                      "--result", result_path, "--workers", workers], cwd=work,
                     log_stem=work / "logs" / f"torchgeo_{tag}", timeout=timeout)
    if r["rc"] != 0:
        return {"failed": f"rc={r['rc']}", "log": r["log"], "wall_s": r["wall_s"],
                "stderr_tail": Path(r["log"]).read_text()[-2000:]}
    inner = json.loads(result_path.read_text()) if result_path.is_file() else {}
    chips = inner.get("chips")
    out = {k: r[k] for k in ("wall_s", "cpu_util_cores", "peak_rss_bytes", "peak_rss_sampled_bytes", "rss_timeline")}
    out.update(inner)
    out["chips_per_s"] = round(chips / r["wall_s"], 2) if chips else None
    if out_store.exists():
        fs = [p for p in out_store.rglob("*") if p.is_file()]
        out["store_bytes"], out["store_files"] = sum(p.stat().st_size for p in fs), len(fs)
    return out


# ---------------------------------------------------------------- machine

def _gdalwarp_version() -> str:
    try:
        return subprocess.run(["gdalwarp", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unavailable ({e})"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict:
    import numpy
    import psutil
    import rasterio
    import zarr

    import sarflow

    tile_py = REPO / "src" / "sarflow" / "tile.py"
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rasterio": rasterio.__version__,
        "rasterio_gdal": rasterio.__gdal_version__,
        "gdalwarp": _gdalwarp_version(),
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "sarflow": sarflow.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_src": bool(_git("status", "--porcelain", "--", "src")),
        "tile_py_sha256": hashlib.sha256(tile_py.read_bytes()).hexdigest()[:16] if tile_py.is_file() else None,
    }


def tile_defaults() -> dict:
    from dataclasses import asdict

    from sarflow.data.ingest import GDAL_CACHE_BYTES
    from sarflow.data.tile import TileOptions

    d = asdict(TileOptions())
    d.pop("overwrite", None)
    d.pop("checksum", None)
    d["split_fractions"] = list(d["split_fractions"])
    d["gdal_cache_bytes"] = GDAL_CACHE_BYTES
    return d


# ---------------------------------------------------------------- report

def _mean(values):
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def _per(n, d, digits=2):
    return round(n / d, digits) if d else None


def add_floor_ratios(entry: dict) -> None:
    """sarflow's CPU seconds against the floor (the 1.2x goal), chips per CPU second of each, and the
    M3LEO projection from the measured CPU per chip."""
    fl, sf, nc, lib = entry["floor"], entry["sarflow"], entry["sarflow_no_checksum"], entry["sarflow_library"]
    chips = sf["chips"]
    if not fl["chips"] == lib["chips"] == chips:
        raise SystemExit(f"chip counts differ: tile {chips}, library {lib['chips']}, floor {fl['chips']}")
    r = entry["ratios"]
    r["sarflow_cpu_over_floor"] = _ratio(sf["cpu_s"], fl["cpu_s"])  # the command as run: start-up, checksums
    r["sarflow_no_checksum_cpu_over_floor"] = _ratio(nc["cpu_s"], fl["cpu_s"])
    r["library_cpu_over_floor"] = _ratio(lib["cpu_s"], fl["cpu_s"])  # plan + units + finalize, in-process
    r["units_cpu_over_floor"] = _ratio(lib["steps"]["units"]["cpu_s"], fl["cpu_s"])
    entry["chips_per_cpu_s"] = {"sarflow": _per(chips, sf["cpu_s"]), "sarflow_no_checksum": _per(chips, nc["cpu_s"]),
                                "library": _per(chips, lib["cpu_s"]), "units": _per(chips, lib["steps"]["units"]["cpu_s"]),
                                "floor": _per(chips, fl["cpu_s"])}
    entry["m3leo_hours"] = {
        "note": f"{M3LEO_CHIPS:,} chips of {M3LEO_CHIP_PX} px (same bands), N one-core workers, from the CPU per "
                f"chip measured here scaled by pixels ({M3LEO_CHIP_PX}/{entry['chip_size']})^2",
        "library": m3leo_hours(lib["cpu_s"] / chips, entry["chip_size"]),
        "floor": m3leo_hours(fl["cpu_s"] / chips, entry["chip_size"]),
        # `plan` runs in ONE process (its screening and warps of undecided blocks in `workers` threads): its share
        # does not divide by N; these are its CPU hours alone at M3LEO scale
        "plan_cpu_hours_one_process": m3leo_hours(lib["steps"]["plan"]["cpu_s"] / chips, entry["chip_size"],
                                                  workers=(1,))["1_workers"]}


ROUND_KEYS = ("sarflow_cpu_s", "library_cpu_s", "plan_cpu_s", "units_cpu_s", "floor_cpu_s",
              "sarflow_cpu_over_floor", "library_cpu_over_floor", "units_cpu_over_floor")


def _round_figures(sf: dict, lib: dict, fl: dict) -> dict:
    st = lib["steps"]
    return {"sarflow_cpu_s": sf["cpu_s"], "library_cpu_s": lib["cpu_s"], "plan_cpu_s": st["plan"]["cpu_s"],
            "units_cpu_s": st["units"]["cpu_s"], "floor_cpu_s": fl["cpu_s"],
            "sarflow_cpu_over_floor": _ratio(sf["cpu_s"], fl["cpu_s"]),
            "library_cpu_over_floor": _ratio(lib["cpu_s"], fl["cpu_s"]),
            "units_cpu_over_floor": _ratio(st["units"]["cpu_s"], fl["cpu_s"])}


def run_rounds(entry: dict, catalog: Path, store: Path, work: Path, label: str, rounds: int, timeout: float,
               workers: int, env_extra: dict) -> None:
    """`--rounds N`: on a shared machine CPU seconds drift by 10-25 % within minutes, so one command set
    against one floor run minutes later measures the drift as much as the tiler. Rounds 2..N run
    sarflow tile, the tiler in-process and the floor again, back to back; each round's ratios are
    taken within it (`rounds`, round 1 being the main sequence) and their medians, with the median
    CPU seconds of each part, are what the summary uses (`median_of_rounds`)."""
    import statistics

    done = [_round_figures(entry["sarflow"], entry["sarflow_library"], entry["floor"])]
    lib_store = store.with_name(store.stem + "_library_rounds.zarr")
    for i in range(2, rounds + 1):
        print(f"[{label}] round {i} of {rounds}: sarflow tile, in-process, floor ...", flush=True)
        sf = run_sarflow(catalog, store, work, f"{label}_checksum_round{i}", [], timeout, env_extra)
        lib = run_library(catalog, lib_store, workers)
        shutil.rmtree(lib_store, ignore_errors=True)
        fl = run_floor(store, catalog, workers)
        if not sf["chips"] == lib["chips"] == fl["chips"] == entry["sarflow"]["chips"]:
            raise SystemExit(f"[{label}] round {i}: chip counts differ from round 1")
        done.append(_round_figures(sf, lib, fl))
        print(f"[{label}]   tile / floor {done[-1]['sarflow_cpu_over_floor']}, in-process / floor "
              f"{done[-1]['library_cpu_over_floor']}", flush=True)
    entry["rounds"] = done
    entry["median_of_rounds"] = {k: round(statistics.median(r[k] for r in done), 4) for k in ROUND_KEYS}


def _cpu(s: dict, part: str) -> float:
    """CPU seconds of `part` ("sarflow", "library", "floor") of a scene: the median of its rounds when
    it ran several, else the one run's."""
    if "median_of_rounds" in s:
        return s["median_of_rounds"][f"{part}_cpu_s"]
    return s[{"sarflow": "sarflow", "library": "sarflow_library", "floor": "floor"}[part]]["cpu_s"]


def _floor_ratio(s: dict, name: str):
    """A ratio to the floor: the median of the rounds' own ratios when the scene ran several."""
    return s["median_of_rounds"][name] if "median_of_rounds" in s and name in s["median_of_rounds"] else s["ratios"][name]


def _key(s: dict) -> str:
    return f"{s['size_px']}_c{s.get('chip_size', 256)}"


def marginal_per_chip(sizes: list[dict]) -> dict:
    """Per chip size, between the smallest and the largest scene: the extra CPU seconds per extra chip of
    sarflow tile, of the tiler in-process and of the floor, and their ratios. What a fixed cost (start-up,
    imports, the plan's and finalize's per-store work) adds vanishes from it: the cost per chip that a
    worker pays at scale, where a unit holds thousands of chips."""
    out = {}
    for chip in sorted({s.get("chip_size") for s in sizes}):
        same = sorted((s for s in sizes if s.get("chip_size") == chip and "floor" in s), key=lambda s: s["size_px"])
        if len(same) < 2 or same[-1]["sarflow"]["chips"] == same[0]["sarflow"]["chips"]:
            continue
        lo, hi = same[0], same[-1]
        extra_chips = hi["sarflow"]["chips"] - lo["sarflow"]["chips"]
        per = {name: (_cpu(hi, name) - _cpu(lo, name)) / extra_chips for name in ("sarflow", "library", "floor")}
        out[str(chip)] = {"between": [_key(lo), _key(hi)], "extra_chips": extra_chips,
                          "cpu_s_per_chip": {k: round(v, 5) for k, v in per.items()},
                          "sarflow_over_floor": _ratio(per["sarflow"], per["floor"]),
                          "library_over_floor": _ratio(per["library"], per["floor"])}
    return out


def summarize(sizes: list[dict]) -> dict:
    ok = [s for s in sizes if "sarflow" in s]
    if not ok:
        return {}
    rss = {_key(s): s["sarflow"]["peak_rss_bytes"] for s in ok}
    flats = {}  # largest / smallest scene of each chip size
    for chip in sorted({s.get("chip_size") for s in ok}):
        same = [s for s in ok if s.get("chip_size") == chip]
        lo, hi = min(same, key=lambda s: s["size_px"]), max(same, key=lambda s: s["size_px"])
        flats[str(chip)] = _ratio(hi["sarflow"]["peak_rss_bytes"], lo["sarflow"]["peak_rss_bytes"])
    flat = max((v for v in flats.values() if v is not None), default=None)
    largest = max(ok, key=lambda s: s["size_px"])
    ratios = {_key(s): s["ratios"].get("sarflow_over_gdalwarp") for s in ok}
    fpc = {_key(s): s["store"]["max_files_per_chip_per_array"] for s in ok}
    floor = {_key(s): _floor_ratio(s, "sarflow_cpu_over_floor") for s in ok if "floor" in s}
    tg = {_key(s): s["ratios"].get("torchgeo_recorded_cpu_per_unique_chip_over_sarflow_cpu_per_chip")
          for s in ok if s.get("torchgeo_recorded")}
    extra = {}
    if floor:
        extra["sarflow_cpu_within_1.2x_floor"] = {
            "marginal_per_chip": marginal_per_chip(ok),
            "value": floor, "goal": GOAL_FLOOR, "met": all(v is not None and v <= GOAL_FLOOR for v in floor.values()),
            "rounds": {_key(s): len(s.get("rounds") or [None]) for s in ok if "floor" in s},
            "breakdown": {_key(s): {k: _floor_ratio(s, k) for k in ("sarflow_no_checksum_cpu_over_floor",
                                                                   "library_cpu_over_floor", "units_cpu_over_floor")}
                          for s in ok if "floor" in s}}
    if tg:
        extra["torchgeo_cpu_per_unique_chip_ge_3x_sarflow"] = {
            "value": tg, "goal": GOAL_TORCHGEO, "met": all(v is not None and v >= GOAL_TORCHGEO for v in tg.values()),
            "value_both_from_the_recorded_run": {_key(s): s["torchgeo_recorded"]["cpu_per_unique_chip_over_sarflow_then_per_chip"]
                                                 for s in ok if s.get("torchgeo_recorded")},
            # the same with the scene's coarse sources stored coarse (--coarse): the store then holds those sources
            # at a coarser resolution (read back upsampled) where torchgeo's chips hold them upsampled
            "value_coarse_sources_stored_coarse": {
                _key(s): s["ratios"]["torchgeo_recorded_cpu_per_unique_chip_over_sarflow_coarse_stored_cpu_per_chip"]
                for s in ok if "torchgeo_recorded_cpu_per_unique_chip_over_sarflow_coarse_stored_cpu_per_chip" in s["ratios"]},
            "note": "value: torchgeo from the recorded run (results/tile_vs_torchgeo.json), sarflow from this run; CPU "
                    "seconds grow with the machine's load, so the like-for-like figure is both from the recorded run"}
    return {
        "peak_rss_bytes_per_size": rss,
        "peak_rss_largest_over_smallest": flat,
        "peak_rss_largest_over_smallest_per_chip_size": flats,
        "sarflow_cpu_over_floor_per_size": floor,
        "sarflow_over_gdalwarp_per_size": ratios,
        "max_files_per_chip_per_array_per_size": fpc,
        "goals": {
            "sarflow_over_gdalwarp_le_2": {
                "value": ratios, "goal": GOAL_RATIO_GDALWARP,
                "met": all(v is not None and v <= GOAL_RATIO_GDALWARP for v in ratios.values())},
            "peak_rss_le_1.5GB_at_largest": {
                "value": largest["sarflow"]["peak_rss_bytes"], "goal": GOAL_RSS_BYTES,
                "met": largest["sarflow"]["peak_rss_bytes"] <= GOAL_RSS_BYTES},
            "peak_rss_flat_across_sizes": {
                "value": flat, "goal": f"largest/smallest <= {GOAL_RSS_FLAT}",
                "met": flat is not None and flat <= GOAL_RSS_FLAT},
            "files_per_chip_per_array_le_1/64": {
                "value": fpc, "goal": GOAL_FILES_PER_CHIP_PER_ARRAY,
                "met": all(v <= GOAL_FILES_PER_CHIP_PER_ARRAY for v in fpc.values()),
                "shard_layout_ok": all(s["store"]["shard_layout_ok"] for s in ok),
                "note": "counts every file of an array (shards + zarr.json); with 64 chips per shard the "
                        "partial last shard and the metadata file put it just above 1/64 unless the chip "
                        "count is large; see shard_files_per_chip in each size's store.arrays"},
            **extra,
        },
    }


def print_table(result: dict) -> None:
    rows = []
    hdr = ("size", "chips", "synth s", "tile s", "tile -ck s", "ck cost s", "gdalwarp s", "ratio", "ratio -ck",
           "cpu ratio", "chips/s", "RSS MB", "store MB", "input MB", "store/in", "files/chip", "f/chip/arr",
           "other load", "torchgeo s")
    for s in result["sizes"]:
        if "sarflow" not in s:
            rows.append((_key(s), "error: " + s.get("error", "?")))
            continue
        sf, nc, st = s["sarflow"], s["sarflow_no_checksum"], s["store"]
        gw = s.get("gdalwarp", {})
        tg = s.get("torchgeo", {})
        rows.append((
            _key(s), str(sf["chips"]), f"{s['scene']['generation_s']:.1f}", f"{sf['wall_s']:.1f}",
            f"{nc['wall_s']:.1f}", f"{s['checksum_cost_s']:.1f}", f"{gw['wall_s']:.1f}" if "wall_s" in gw else "-",
            f"{s['ratios']['sarflow_over_gdalwarp']:.2f}" if s["ratios"].get("sarflow_over_gdalwarp") else "-",
            f"{s['ratios']['sarflow_no_checksum_over_gdalwarp']:.2f}"
            if s["ratios"].get("sarflow_no_checksum_over_gdalwarp") else "-",
            f"{s['ratios']['sarflow_cpu_over_gdalwarp_cpu']:.2f}"
            if s["ratios"].get("sarflow_cpu_over_gdalwarp_cpu") else "-",
            f"{sf['chips_per_s']:.1f}", f"{sf['peak_rss_bytes'] / MB:.0f}", f"{st['bytes'] / MB:.0f}",
            f"{st['input_bytes'] / MB:.0f}", f"{st['bytes_over_input']:.2f}", f"{st['files_per_chip']:.4f}",
            f"{st['max_files_per_chip_per_array']:.4f}",
            f"{sf['other_processes_cores']:.2f}" if sf.get("other_processes_cores") is not None else "-",
            f"{tg['wall_s']:.1f}" if "wall_s" in tg else ("skipped" if "skipped" in tg else "failed"),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows if len(r) > i)) for i, h in enumerate(hdr)]
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    summ = result.get("summary") or {}
    if summ:
        print(f"peak RSS largest/smallest: {summ['peak_rss_largest_over_smallest']}")
        for name, g in summ["goals"].items():
            print(f"goal {name}: {'met' if g['met'] else 'NOT met'} (value {g['value']}, goal {g['goal']})")
        for chip, m in ((summ["goals"].get("sarflow_cpu_within_1.2x_floor") or {}).get("marginal_per_chip") or {}).items():
            print(f"marginal CPU per chip, {m['between'][0]} -> {m['between'][1]} ({m['extra_chips']} more chips): "
                  f"sarflow tile / floor {m['sarflow_over_floor']}, in-process / floor {m['library_over_floor']}")
    print("ratio = sarflow tile wall / sum of sequential default gdalwarp walls (one per source file); "
          "-ck = --no-checksum; cpu ratio = the same with CPU seconds; f/chip/arr = files of the worst array / "
          "chips (goal <= 1/64 = 0.0156); other load = cores busy with other processes during the sarflow run "
          f"(of {os.cpu_count()})")
    print_floor_table(result)


def print_floor_table(result: dict) -> None:
    """CPU seconds against the floor, chips per CPU second, and the M3LEO projection."""
    done = [s for s in result["sizes"] if "floor" in s]
    if not done:
        return
    hdr = ("scene", "chips", "tile cpu", "-ck cpu", "plan", "units", "final", "floor warp", "floor enc", "floor",
           "tile/floor", "-ck/floor", "lib/floor", "units/floor", "chips/cpu-s tile", "floor", "tg/sarflow",
           "M3LEO h 16/64/256/1024 (lib)", "load")
    rows = []
    for s in done:
        sf, nc, lib, fl, r = s["sarflow"], s["sarflow_no_checksum"], s["sarflow_library"], s["floor"], s["ratios"]
        st = lib["steps"]
        tg = r.get("torchgeo_recorded_cpu_per_unique_chip_over_sarflow_cpu_per_chip")
        rows.append((_key(s), str(sf["chips"]), f"{sf['cpu_s']:.1f}", f"{nc['cpu_s']:.1f}", f"{st['plan']['cpu_s']:.1f}",
                     f"{st['units']['cpu_s']:.1f}", f"{st['finalize']['cpu_s']:.1f}", f"{fl['warp']['cpu_s']:.1f}",
                     f"{fl['encode']['cpu_s']:.1f}", f"{fl['cpu_s']:.1f}", f"{r['sarflow_cpu_over_floor']:.2f}",
                     f"{r['sarflow_no_checksum_cpu_over_floor']:.2f}", f"{r['library_cpu_over_floor']:.2f}",
                     f"{r['units_cpu_over_floor']:.2f}", f"{s['chips_per_cpu_s']['sarflow']:.2f}",
                     f"{s['chips_per_cpu_s']['floor']:.2f}", f"{tg:.2f}" if tg else "-",
                     "/".join(str(v) for v in s["m3leo_hours"]["library"].values()),
                     f"{s['loadavg_at_start'][0]:.1f}"))
        c = s.get("coarse_stored") or {}
        if "ratios" in c:  # the same scene with its coarse sources stored coarse
            fc, cs = c["floor"], c["sarflow_library"]["steps"]
            rows.append((_key(s) + " coarse", str(c["sarflow"]["chips"]), f"{c['sarflow']['cpu_s']:.1f}", "-",
                         f"{cs['plan']['cpu_s']:.1f}", f"{cs['units']['cpu_s']:.1f}", f"{cs['finalize']['cpu_s']:.1f}",
                         f"{fc['warp']['cpu_s']:.1f}", f"{fc['encode']['cpu_s']:.1f}", f"{fc['cpu_s']:.1f}",
                         f"{c['ratios']['sarflow_cpu_over_floor']:.2f}", "-", f"{c['ratios']['library_cpu_over_floor']:.2f}",
                         f"{c['ratios']['units_cpu_over_floor']:.2f}", f"{c['chips_per_cpu_s']['sarflow']:.2f}",
                         f"{c['chips_per_cpu_s']['floor']:.2f}", "-",
                         "/".join(str(v) for v in c["m3leo_hours"]["library"].values()), "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"CPU seconds (getrusage); floor = GDAL warp of every input once over the grid + Blosc encode of every chip, "
          f"same threads; plan/units/final = the library in-process (no start-up, no checksum); tg/sarflow = torchgeo's "
          f"CPU per unique chip (recorded run) / sarflow tile's per chip (goal >= {GOAL_TORCHGEO}); goal tile/floor <= "
          f"{GOAL_FLOOR}; M3LEO h = {M3LEO_CHIPS:,} chips of {M3LEO_CHIP_PX} px on N one-core workers; load = 1-min "
          "load average at the start")
    for s in done:
        if "median_of_rounds" in s:
            m = s["median_of_rounds"]
            print(f"{_key(s)}: median of {len(s['rounds'])} rounds: tile / floor {m['sarflow_cpu_over_floor']}, "
                  f"in-process / floor {m['library_cpu_over_floor']}, units / floor {m['units_cpu_over_floor']} "
                  f"(each round: {', '.join(str(r['sarflow_cpu_over_floor']) for r in s['rounds'])})")


# ---------------------------------------------------------------- main

def bench_size(size: int, chip: int, args, work: Path) -> dict:
    entry: dict = {"size_px": size, "chip_size": chip, "started_at": _now(), "loadavg_at_start": os.getloadavg()}
    catalog, scene = ensure_scene(size, chip, args.seed, work, args.timeout)
    inputs = catalog_inputs(catalog)
    scene["input_files"] = len(inputs)
    read_s, sha_s = warm_read(inputs)
    scene["warm_read_s"], scene["sha256_inputs_s"] = round(read_s, 3), round(sha_s, 3)
    entry["scene"] = scene
    store = work / f"store_{size}_c{chip}.zarr"
    size = f"{size}_c{chip}"  # the label of this scene config: logs, temporary folders

    print(f"[{size}] sarflow tile ...", flush=True)
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    entry["sarflow"] = run_sarflow(catalog, store, work, f"{size}_checksum", [], args.timeout, env_extra, args.repeat)
    sizes, _ = store_inputs(store, catalog)
    entry["store"] = inspect_store(store, sum(sizes.values()), tile_defaults()["shard_chips"])
    entry["store"]["path"] = str(store)
    print(f"[{size}]   {entry['sarflow']['wall_s']:.1f} s, {entry['sarflow']['chips']} chips, "
          f"peak RSS {entry['sarflow']['peak_rss_bytes'] / MB:.0f} MB", flush=True)

    print(f"[{size}] sarflow tile --no-checksum ...", flush=True)
    entry["sarflow_no_checksum"] = run_sarflow(catalog, store, work, f"{size}_nochecksum", ["--no-checksum"],
                                               args.timeout, env_extra, args.repeat)
    assert entry["sarflow_no_checksum"]["chips"] == entry["sarflow"]["chips"]
    # the difference of two walls (noisy on a shared machine) and the direct cost of hashing the inputs
    entry["checksum_cost_s"] = round(entry["sarflow"]["wall_s"] - entry["sarflow_no_checksum"]["wall_s"], 3)
    entry["sha256_inputs_s"] = scene["sha256_inputs_s"]
    print(f"[{size}]   {entry['sarflow_no_checksum']['wall_s']:.1f} s", flush=True)

    entry["ratios"] = {}
    if not args.skip_gdalwarp:
        print(f"[{size}] gdalwarp anchor ...", flush=True)
        entry["gdalwarp"] = run_gdalwarp(store, catalog, work, str(size), args.timeout, repeat=args.repeat)
        gw = entry["gdalwarp"]["wall_s"]
        entry["ratios"]["sarflow_over_gdalwarp"] = _ratio(entry["sarflow"]["wall_s"], gw)
        entry["ratios"]["sarflow_no_checksum_over_gdalwarp"] = _ratio(entry["sarflow_no_checksum"]["wall_s"], gw)
        # CPU seconds are far less sensitive than wall time to other load on a shared machine
        entry["ratios"]["sarflow_cpu_over_gdalwarp_cpu"] = _ratio(entry["sarflow"]["cpu_s"], entry["gdalwarp"]["cpu_s"])
        if "loop_s" in entry["sarflow"]:
            entry["ratios"]["sarflow_loop_over_gdalwarp"] = _ratio(entry["sarflow"]["loop_s"], gw)
        print(f"[{size}]   {gw:.1f} s (ratio {entry['ratios']['sarflow_over_gdalwarp']})", flush=True)
        if args.gdalwarp_mt:
            entry["gdalwarp_multithreaded"] = run_gdalwarp(store, catalog, work, f"{size}_mt", args.timeout,
                                                           multithread=True, repeat=args.repeat)
            entry["ratios"]["sarflow_over_gdalwarp_multithreaded"] = _ratio(
                entry["sarflow"]["wall_s"], entry["gdalwarp_multithreaded"]["wall_s"])
    else:
        entry["gdalwarp"] = {"skipped": "--skip-gdalwarp"}

    if not args.skip_floor:
        workers = tile_defaults()["workers"]
        print(f"[{size}] sarflow's tiler in-process (plan / units / finalize CPU) ...", flush=True)
        lib_store = work / f"store_{entry['size_px']}_c{chip}_library.zarr"
        entry["sarflow_library"] = run_library(catalog, lib_store, workers)
        shutil.rmtree(lib_store, ignore_errors=True)
        print(f"[{size}] floor: warp every input once over the grid + encode every chip ...", flush=True)
        entry["floor"] = run_floor(store, catalog, workers)
        add_floor_ratios(entry)
        print(f"[{size}]   floor {entry['floor']['cpu_s']:.1f} CPU s, sarflow tile "
              f"{entry['sarflow']['cpu_s']:.1f} CPU s (x{entry['ratios']['sarflow_cpu_over_floor']})", flush=True)
        if args.rounds > 1:
            run_rounds(entry, catalog, store, work, size, args.rounds, args.timeout, workers, env_extra)
        if args.coarse:
            print(f"[{size}] coarse sources stored coarse (store_resolution): sarflow tile + floor ...", flush=True)
            try:
                entry["coarse_stored"] = run_coarse(catalog, work, size, entry, args.timeout, workers)
            except SystemExit as e:  # an optional row: its failure is recorded, the rest stands
                entry["coarse_stored"] = {"error": str(e)[:3000]}
            c = entry["coarse_stored"]
            if "ratios" in c:
                print(f"[{size}]   {c['sarflow']['cpu_s']:.1f} CPU s (x{c['ratios']['sarflow_cpu_over_full_resolution_cpu']}"
                      f" of full resolution), floor {c['floor']['cpu_s']:.1f}", flush=True)

    if args.torchgeo_python:
        print(f"[{size}] torchgeo anchor ...", flush=True)
    entry["torchgeo"] = run_torchgeo(args.torchgeo_python, store, catalog, work, str(size),
                                     args.torchgeo_workers, args.timeout)
    if "wall_s" in entry["torchgeo"] and "skipped" not in entry["torchgeo"] and "failed" not in entry["torchgeo"]:
        entry["ratios"]["sarflow_over_torchgeo"] = _ratio(entry["sarflow"]["wall_s"], entry["torchgeo"]["wall_s"])
    else:
        entry["torchgeo_recorded"] = recorded_torchgeo(entry["size_px"], chip)
        if entry["torchgeo_recorded"]:
            # the goal: torchgeo's CPU per unique chip position >= 3x sarflow's CPU per chip (whole commands; the
            # median of the rounds when there were several)
            entry["ratios"]["torchgeo_recorded_cpu_per_unique_chip_over_sarflow_cpu_per_chip"] = _ratio(
                entry["torchgeo_recorded"]["cpu_s_per_unique_chip"], _cpu(entry, "sarflow") / entry["sarflow"]["chips"])
            c = entry.get("coarse_stored") or {}
            if "sarflow" in c:  # sarflow storing the coarse sources coarse (torchgeo still upsamples them to the grid)
                entry["ratios"]["torchgeo_recorded_cpu_per_unique_chip_over_sarflow_coarse_stored_cpu_per_chip"] = _ratio(
                    entry["torchgeo_recorded"]["cpu_s_per_unique_chip"], c["sarflow"]["cpu_s"] / c["sarflow"]["chips"])
    if args.clean:
        shutil.rmtree(store, ignore_errors=True)
    entry["finished_at"] = _now()
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,10980", help="scene sides in 10 m pixels, comma separated")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="results folder (tile.json is written in it) or a .json file path")
    ap.add_argument("--work", default=str(HERE / "work"), help="cache of scenes, stores, logs (gitignored)")
    ap.add_argument("--chip-sizes", "--chip-size", dest="chip_sizes", default="256",
                    help="chip sides in pixels, comma separated: every scene size is benchmarked at each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torchgeo-python", default=None,
                    help="a python interpreter with torchgeo 0.8.1 (and zarr); without it torchgeo is skipped")
    ap.add_argument("--torchgeo-workers", type=int, default=2, help="DataLoader workers of the torchgeo anchor")
    ap.add_argument("--skip-gdalwarp", action="store_true", help="do not run the gdalwarp anchor")
    ap.add_argument("--skip-floor", action="store_true",
                    help="do not run the floor anchor (warp every input once + encode every chip) and the in-process tiler")
    ap.add_argument("--gdalwarp-mt", action="store_true",
                    help="also run gdalwarp with -multi -wo NUM_THREADS=ALL_CPUS (an extra, informative anchor)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed to any one child process")
    ap.add_argument("--clean", action="store_true", help="delete each chip store after measuring it")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of (sarflow tile, in-process, floor) back to back per scene; the floor ratios are "
                         "the medians of each round's own (CPU seconds drift within minutes on a shared machine)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every timed command this many times and keep the fastest (all walls are recorded)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the sarflow tile runs (e.g. OPENBLAS_NUM_THREADS=1), recorded")
    ap.add_argument("--coarse", action="store_true",
                    help="also tile each scene with its coarse sources stored coarse (catalog key store_resolution)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run for tests: --sizes 512 --chip-sizes 64 --skip-gdalwarp, results to tile_smoke.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.chip_sizes, args.skip_gdalwarp = "512", "64", True
        if args.out == ap.get_default("out"):
            args.out = str(HERE / "results" / "tile_smoke.json")

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    chip_sizes = [int(c) for c in args.chip_sizes.split(",") if c.strip()]
    out = Path(args.out)
    out_file = out if out.suffix == ".json" else out / "tile.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("gdalwarp") is None and not args.skip_gdalwarp:
        raise SystemExit("gdalwarp not found: install gdal-bin (make gdal) or pass --skip-gdalwarp")

    result = {
        "benchmark": "sarflow tile vs gdalwarp, the floor of its design (and torchgeo)",
        "loadavg_at_start": os.getloadavg(),
        "started_at": _now(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": machine_info(),
        "config": {"chip_size": chip_sizes[0] if len(chip_sizes) == 1 else None, "chip_sizes": chip_sizes,
                   "seed": args.seed, "tile_options": tile_defaults(),
                   "repeat": args.repeat, "sarflow_env": dict(kv.split("=", 1) for kv in args.env),
                   "params_yaml": "not read (children run in the work folder)", "work": str(work)},
        "sizes": [],
    }
    # what every `sarflow tile` child pays before tiling: the interpreter and the tiler's imports
    imports = run_measured([sys.executable, "-c", "import sarflow.cli.main, sarflow.data.tile, sarflow.data.tile_units, "
                            "geopandas, pyarrow.parquet"], cwd=work, log_stem=work / "logs" / "startup", timeout=300)
    result["sarflow_startup"] = {k: imports[k] for k in ("cpu_s", "wall_s", "loadavg_1min_at_start")}
    for size in sizes:
        for chip in chip_sizes:
            try:
                entry = bench_size(size, chip, args, work)
            except SystemExit as e:
                entry = {"size_px": size, "chip_size": chip, "error": str(e)[:4000]}
                print(f"[{size}_c{chip}] FAILED: {e}", file=sys.stderr, flush=True)
            result["sizes"].append(entry)
            result["summary"] = summarize(result["sizes"])
            out_file.write_text(json.dumps(result, indent=1))  # after each config: a long run leaves partial results
    result["torchgeo"] = (run_torchgeo(None, Path(), Path(), work, "", 0, 0) if not args.torchgeo_python
                          else {"python": args.torchgeo_python, "results": "per size, under sizes[].torchgeo"})
    result["finished_at"] = _now()
    result["loadavg_at_end"] = os.getloadavg()
    out_file.write_text(json.dumps(result, indent=1))
    print()
    print_table(result)
    print(f"\nresults: {out_file}")
    return 1 if any("error" in s for s in result["sizes"]) else 0


if __name__ == "__main__":
    sys.exit(main())

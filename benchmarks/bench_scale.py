"""Tiling throughput past one process: plan -> units in 1, 2, 4 worker processes -> finalize, into a
local store and into S3 (moto on 127.0.0.1), with the scaling efficiency and a projection to M3LEO
scale (10M chips of 448 px) for N workers from the measured per-unit cost.

    .venv/bin/python benchmarks/bench_scale.py [--size 1024] [--chip 64] [--workers 1 2 4]

Every worker is a separate `sarflow tile-unit --runs P --run I` process (as a pipeline task or a pod
of the Indexed Job: its own interpreter start-up, one run of consecutive units), one worker too.
The plan's screening is measured the same way on a larger scene (`--plan-size`): survey, P `sarflow
tile-screen --part I` processes, commit. Writes benchmarks/results/bench_scale.json. Wall time on a
shared machine is noisy, so CPU seconds (this process and its worker processes) are reported beside
it; chips/s per CPU second is the figure that carries to another machine. The projection assumes
the per-chip cost scales with the pixels of a chip (448² / chip²) and the same bands as the
synthetic scene; it excludes the plan step (reported on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cost import cpu_seconds, m3leo_hours, run_processes  # benchmarks/cost.py, beside this script
from machine import git_commit, host

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn):
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w0, cpu_seconds() - c0


SARFLOW = str(Path(sys.executable).with_name("sarflow"))
PROJECTION_NOTE = ("from units of one shard and blocks of --block-chips (4x4 chips: 256 px warp windows at 64 px "
                   "chips), chosen to cut a small scene into many units: per pixel dearer than the default 1024 px "
                   "windows; plan with bench_tile.py's projection (default options), this one tells the scaling")


def run_once(catalog: Path, out: str, processes: int, options) -> dict:
    """plan (this process), the units in `processes` `sarflow tile-unit --runs P --run I` processes at
    once (each a run of consecutive units, as the pipeline's tasks and the Indexed Job's pods; one
    worker is a process too, so every count pays the same start-up per worker), finalize."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import finalize, plan

    _remove(out)  # every round plans from nothing (a previous round's store is not removed inside the timing)
    p, plan_wall, plan_cpu = _timed(lambda: plan(load_catalog(catalog), out, options))
    _, units_wall, units_cpu = _timed(lambda: run_processes(
        [[SARFLOW, "tile-unit", out, "--runs", str(processes), "--run", str(i), "--workers", "1"]
         for i in range(processes)]))
    _, fin_wall, fin_cpu = _timed(lambda: finalize(out))
    wall = plan_wall + units_wall + fin_wall
    return {"processes": processes, "chips": p.total, "units": len(p.units),
            "plan_s": round(plan_wall, 2), "plan_cpu_s": round(plan_cpu, 2),
            "units_s": round(units_wall, 2), "units_cpu_s": round(units_cpu, 2),
            "finalize_s": round(fin_wall, 2), "end_to_end_s": round(wall, 2),
            "units_chips_per_s": round(p.total / units_wall, 2),
            "end_to_end_chips_per_s": round(p.total / wall, 2),
            "units_chips_per_cpu_s": round(p.total / max(units_cpu, 1e-9), 2)}


def _remove(out: str) -> None:
    """A store (local or s3://) and what a build leaves beside it, gone."""
    if out.startswith("s3://"):
        from sarflow.data.storage import s3_filesystem

        fs = s3_filesystem()
        if fs.exists(out[len("s3://"):]):
            fs.rm(out[len("s3://"):], recursive=True)
        return
    for path in (out, out + ".partial", out + ".replaced"):
        shutil.rmtree(path, ignore_errors=True)


def _median_round(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median of the rounds (the lower middle one of an even count), with
    every round's `key` beside it."""
    ranked = sorted(runs, key=lambda r: r[key])
    return {**ranked[(len(ranked) - 1) // 2], f"rounds_{key}": [r[key] for r in runs]}


def plan_in_parts(catalog: Path, out: str, processes: int, options) -> dict:
    """The plan with its screening in `processes` `sarflow tile-screen --part I` processes at once:
    survey (this process: ingest, the blocks cut into parts), the parts, commit (this process)."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import commit_plan, survey

    s, survey_wall, survey_cpu = _timed(lambda: survey(load_catalog(catalog), out, options, processes))
    _, screen_wall, screen_cpu = _timed(lambda: run_processes(
        [[SARFLOW, "tile-screen", out, "--part", str(i), "--workers", "1"] for i in range(len(s.parts))]))
    p, commit_wall, commit_cpu = _timed(lambda: commit_plan(out))
    return {"processes": processes, "parts": len(s.parts), "chips": p.total,
            "survey_s": round(survey_wall, 2), "survey_cpu_s": round(survey_cpu, 2),
            "screen_s": round(screen_wall, 2), "screen_cpu_s": round(screen_cpu, 2),
            "commit_s": round(commit_wall, 2), "commit_cpu_s": round(commit_cpu, 2),
            "plan_s": round(survey_wall + screen_wall + commit_wall, 2),
            "plan_cpu_s": round(survey_cpu + screen_cpu + commit_cpu, 2)}


def per_unit(catalog: Path, out: str, options) -> dict:
    """Each unit alone in this process (one warping thread): wall and CPU seconds per chip."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import plan, write_unit

    p = plan(load_catalog(catalog), out, options)
    rows = []
    for u, (a, b) in enumerate(p.units):
        t0, c0 = time.perf_counter(), time.process_time()
        write_unit(out, u, workers=1)
        rows.append({"unit": u, "chips": b - a, "s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
    chips = sum(r["chips"] for r in rows)
    wall, cpu = sum(r["s"] for r in rows), sum(r["cpu_s"] for r in rows)
    return {"units": len(rows), "chips": chips, "chips_per_s": round(chips / wall, 2),
            "chips_per_cpu_s": round(chips / cpu, 2), "s_per_unit_median": round(sorted(r["s"] for r in rows)[len(rows) // 2], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="synthetic scene side in pixels")
    ap.add_argument("--chip", type=int, default=64)
    ap.add_argument("--shard-chips", type=int, default=16)
    ap.add_argument("--block-chips", type=int, default=4, help="chips per side of a block; keep a block within a "
                    "unit (unit = one shard here), else every unit cut from a block warps all of it again")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="unit processes to try")
    ap.add_argument("--no-s3", action="store_true", help="local disk only")
    ap.add_argument("--plan-size", type=int, default=2048, help="scene side of the plan's measurement (0: skip it)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every worker count back to back; each figure is "
                    "the median round's (the speed of a shared machine's cores drifts within minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_scale.json")
    args = ap.parse_args()

    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile import TileOptions

    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    catalog = synthesize(tmp / "scene", SynthConfig(size_px=args.size, seed=3, chip_size=args.chip))
    options = TileOptions(shard_chips=args.shard_chips, block_chips=args.block_chips, unit_shards=1, workers=1, checksum=False, overwrite=True)
    targets = {"local": lambda tag: str(tmp / f"{tag}.zarr")}
    moto = None
    if not args.no_s3:
        from sarflow.data.storage import ensure_bucket
        from sarflow.local.services import start_s3, stop

        moto, url = start_s3(tmp / "moto.log")
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        ensure_bucket("bench")
        targets["s3"] = lambda tag: f"s3://bench/{tag}.zarr"
    result = {"rounds": args.rounds, "scene_px": args.size, "chip_px": args.chip, "shard_chips": args.shard_chips, "block_chips": args.block_chips, "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg(), "machine": host(), "git_commit": git_commit(ROOT), "targets": {}}
    try:
        rounds = {name: {n: [] for n in args.workers} for name in targets}
        for _ in range(args.rounds):  # every count in every round: a drift of the cores' speed hits them alike
            for name, uri in targets.items():
                for n in args.workers:
                    rounds[name][n].append(run_once(catalog, uri(f"run{n}"), n, options))
        for name, uri in targets.items():
            runs = [_median_round(rounds[name][n], "units_s") for n in args.workers]
            base = runs[0]
            for r in runs:
                r["speedup"] = round(r["units_chips_per_s"] / base["units_chips_per_s"], 2)
                r["efficiency"] = round(r["speedup"] / (r["processes"] / base["processes"]), 2)
            unit = per_unit(catalog, uri("units"), options)
            projection = m3leo_hours(1 / unit["chips_per_cpu_s"], args.chip)
            result["targets"][name] = {"runs": runs, "per_unit": unit,
                                       "m3leo_hours_at_measured_cpu_per_chip": projection,
                                       "m3leo_note": PROJECTION_NOTE}
            print(f"[{name}] per unit: {unit['chips_per_s']} chips/s wall, {unit['chips_per_cpu_s']} chips per CPU s")
            for r in runs:
                print(f"[{name}] {r['processes']} processes: units {r['units_chips_per_s']} chips/s "
                      f"(x{r['speedup']}, efficiency {r['efficiency']}), end to end {r['end_to_end_chips_per_s']} chips/s, "
                      f"plan {r['plan_s']} s")
            print(f"[{name}] M3LEO (10M chips of 448 px), hours for N workers of one core: {projection}")
        if args.plan_size:
            big = synthesize(tmp / "plan_scene", SynthConfig(size_px=args.plan_size, seed=3, chip_size=args.chip))
            tried = {n: [] for n in args.workers}
            for _ in range(args.rounds):
                for n in args.workers:
                    _remove(str(tmp / f"plan{n}.zarr"))
                    tried[n].append(plan_in_parts(big, str(tmp / f"plan{n}.zarr"), n, options))
            plans = [_median_round(tried[n], "plan_s") for n in args.workers]
            for r in plans:
                r["screen_speedup"] = round(plans[0]["screen_s"] / r["screen_s"], 2)
                r["plan_speedup"] = round(plans[0]["plan_s"] / r["plan_s"], 2)
                r["plan_cpu_over_one"] = round(r["plan_cpu_s"] / plans[0]["plan_cpu_s"], 2)
                print(f"[plan {args.plan_size} px] screening in {r['processes']} processes: {r['screen_s']} s "
                      f"(x{r['screen_speedup']}), plan {r['plan_s']} s (x{r['plan_speedup']}), CPU x{r['plan_cpu_over_one']}")
            result["plan"] = {"scene_px": args.plan_size, "runs": plans}
    finally:
        if moto is not None:
            stop(moto)
        shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    sys.exit(main())

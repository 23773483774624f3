"""The inputs' checksums past one process: the survey hashing every input itself (the anchor: one pod
reads all), against `sarflow tile-checksum --parts P` in P processes at once followed by the survey,
which then takes the recorded checksums; and a resumed survey, which reads no input again.

    .venv/bin/python benchmarks/bench_checksums.py [--size 4096] [--rounds 3] [--threads 1]

Every step is a separate `sarflow` process (a pod or a pipeline task: its own start-up). Each
process hashes in `--threads` threads (default 1: one core per pod slot, so P processes on P cores
show the fan-out the cores allow). The inputs are hashed from the page cache (the first round warms
it), so the figures are SHA-256 and process costs, not a disk's or the network's. Reports wall and
CPU seconds (medians of the rounds), a no-op part's cost (start-up), the hashing throughput per CPU
second without it and, from it, the minutes to hash a terabyte of inputs with N parts of one core
(null when the hashing is within the start-up's noise: a scene too small). Writes benchmarks/results/checksums.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from anchored import median
from cost import cpu_seconds, run_processes
from machine import git_commit, host, write_result

ROOT = Path(__file__).resolve().parents[1]
SARFLOW = str(Path(sys.executable).with_name("sarflow"))
PARTS = (1, 16, 64, 256)


def _run(commands: list[list[str]]) -> tuple[float, float]:
    """Runs the commands as processes at once; wall and CPU seconds (children waited for)."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    run_processes(commands)
    return time.perf_counter() - w0, cpu_seconds() - c0


def one_round(catalog: Path, out: Path, processes: list[int], threads: int) -> dict:
    survey = [SARFLOW, "tile-plan", str(catalog), "--out", str(out), "--survey", "1", "--overwrite"]
    row = {}
    shutil.rmtree(str(out) + ".partial", ignore_errors=True)
    # a part past the files: the process's fixed cost (interpreter, imports, catalog), nothing hashed
    wall, cpu = _run([[SARFLOW, "tile-checksum", str(catalog), "--out", str(out), "--parts", "1000", "--part", "999"]])
    row["no_op_part"] = {"s": round(wall, 2), "cpu_s": round(cpu, 2)}
    wall, cpu = _run([survey])  # the anchor: the survey hashes every input (8 threads, as it does by default)
    row["survey_hashing"] = {"s": round(wall, 2), "cpu_s": round(cpu, 2)}
    wall, cpu = _run([survey])  # resumed: every checksum recorded by the survey before
    row["survey_resumed"] = {"s": round(wall, 2), "cpu_s": round(cpu, 2)}
    for n in processes:
        shutil.rmtree(str(out) + ".partial", ignore_errors=True)
        hw, hc = _run([[SARFLOW, "tile-checksum", str(catalog), "--out", str(out), "--parts", str(n), "--part", str(i),
                        "--workers", str(threads), "--overwrite"] for i in range(n)])
        sw, sc = _run([survey])
        row[f"parts_{n}"] = {"checksum_s": round(hw, 2), "checksum_cpu_s": round(hc, 2), "survey_s": round(sw, 2),
                             "survey_cpu_s": round(sc, 2), "s": round(hw + sw, 2), "cpu_s": round(hc + sc, 2)}
    return row


def _largest(parts: list[list[int]]) -> float:
    """The largest part's fraction of all the bytes (1/n when even)."""
    return round(max(sum(p) for p in parts) / sum(sum(p) for p in parts), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="synthetic scene side in pixels")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="checksum processes to try")
    ap.add_argument("--threads", type=int, default=1, help="hashing threads per checksum process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checksums.json")
    args = ap.parse_args()

    from sarflow.data.catalog import load_catalog
    from sarflow.data.ingest import catalog_files, input_sizes
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile_units import checksum_shares

    tmp = Path(tempfile.mkdtemp(prefix="bench_checksums_"))
    try:
        catalog = synthesize(tmp / "scene", SynthConfig(size_px=args.size, seed=3))
        files = catalog_files(load_catalog(catalog))
        sizes = input_sizes(files)
        mb = sum(sizes.values()) / 1e6
        # the largest part's share of the bytes (it sets the wall): the parts as cut (by bytes) and as
        # they were cut before (every n-th file of the sorted list)
        largest_share = {str(n): {"by_bytes": _largest([[sizes[u] for u in share] for share in checksum_shares(sizes, n)]),
                                  "by_file_count": _largest([[sizes[u] for u in files[i::n]] for i in range(n)])}
                         for n in args.processes if n > 1}
        rounds = [one_round(catalog, tmp / "chips.zarr", args.processes, args.threads) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = {k: list(v) for k, v in rounds[0].items()}
    med = {k: {f: median([r[k][f] for r in rounds]) for f in fields} for k, fields in keys.items()}
    for k in med:
        med[k]["rounds_s"] = [r[k]["s"] for r in rounds]
    one = med[f"parts_{args.processes[0]}"]
    hashing_cpu = one["checksum_cpu_s"] - med["no_op_part"]["cpu_s"]
    # MB per CPU second of hashing; not measured when the hashing is lost in the start-up's noise
    rate = mb / hashing_cpu if hashing_cpu > 0.1 * med["no_op_part"]["cpu_s"] else None
    result = {
        "scene_px": args.size, "input_files": len(files), "input_mb": round(mb, 1), "threads": args.threads,
        "rounds": args.rounds, "machine": host(), "git_commit": git_commit(ROOT), "median": med,
        "anchor": "survey_hashing: `tile-plan --survey 1` hashing every input itself (one pod)",
        "survey_resumed_over_anchor_cpu": round(med["survey_resumed"]["cpu_s"] / med["survey_hashing"]["cpu_s"], 2),
        "checksum_speedup": {str(n): round(one["checksum_s"] / med[f"parts_{n}"]["checksum_s"], 2)
                             for n in args.processes},
        "survey_after_parts_over_anchor": round(med[f"parts_{args.processes[-1]}"]["survey_s"]
                                                / med["survey_hashing"]["s"], 2),
        "largest_part_share_of_bytes": largest_share,
        "mb_per_cpu_s": rate and round(rate, 1),
        "rate_note": "MB hashed per CPU second: one checksum process's CPU less a no-op part's (start-up)",
        "minutes_per_tb_of_inputs": rate and {f"{n}_parts": round(1e6 / rate / n / 60, 2) for n in PARTS},
        "note": "hashed from the page cache: SHA-256 and process costs; from S3 a part hashes at its share of the "
                "network's pace, which fanning out over pods multiplies too",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())

"""Tiling's finalize as the chip count grows: CPU seconds and peak memory of `sarflow tile-finalize`
(merging every unit's report into chips.parquet, the train statistics, the coordinate arrays and the
integrity record), this checkout against an anchor commit, side by side in one run.

    .venv/bin/python benchmarks/bench_finalize.py [--anchor REV] [--sizes 2048,4096,8192] [--chip-size 32] [--rounds 3]

For each scene size one synthetic scene is planned with the same chip size (so the units hold as many
chips each and only their number grows) and its units written once per code version (the anchor's
units write the anchor's reports), each version importing its own `src/` (the anchor from a
`git worktree`). Every round copies the built store and runs `sarflow tile-finalize` on the copy as a
separate process: CPU seconds (getrusage of the child) and its peak RSS (its own VmHWM, read by the
child as it exits). Reports the medians, the extra CPU and memory per 1,000 extra chips (the slope
between the two largest chip counts) and, from it, a projection to M3LEO's 10M chips (a straight line:
what finalize would take in one process). Writes benchmarks/results/finalize.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from anchored import CHILD_HEAD, ROOT, anchor_worktree, build_store, median, scene_catalog, version_child
from cost import M3LEO_CHIPS
from machine import git_commit, host, write_result


# a child (PYTHONPATH: the version's src/): build, or finalize and report its own CPU and VmHWM
CHILD = CHILD_HEAD + r"""
elif step == "finalize":
    from sarflow.data.tile_units import finalize
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    finalize(store)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"finalize_cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                      "process_cpu_s": r1.ru_utime + r1.ru_stime, "peak_rss_bytes": hwm}))
"""


def _slope(rows: list[dict], key: str) -> float:
    """Extra `key` per 1,000 extra chips between the two largest chip counts (past what a fixed buffer,
    such as a row group of chips.parquet, holds at the smallest)."""
    lo, hi = rows[-2], rows[-1]
    return (hi[key] - lo[key]) / (hi["chips"] - lo["chips"]) * 1000


def _scene(size: int, chip: int, rounds: int, versions: dict[str, Path], tmp: Path) -> dict[str, dict]:
    """One synthetic scene of `size` px in chips of `chip` px, built once per version and finalized
    `rounds` times on copies (the versions interleaved, under the same load): each version's medians."""
    catalog = scene_catalog(tmp / f"scene_{size}", size, chip)
    built = {name: tmp / f"{name}_{chip}.zarr" for name in versions}
    for name, src in versions.items():
        build_store(CHILD, src, str(built[name]), catalog, workers=2)
    measured = {name: [] for name in versions}
    for _ in range(rounds):
        for name, src in versions.items():
            copy = tmp / f"copy_{name}.zarr"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(str(copy) + ".partial", ignore_errors=True)
            shutil.copytree(str(built[name]) + ".partial", str(copy) + ".partial")
            measured[name].append(version_child(CHILD, src, "finalize", str(copy)))
            shutil.rmtree(copy, ignore_errors=True)
    chips = json.loads(Path(str(built["this"]) + ".partial", "_build", "plan.json").read_text())["total"]
    for name in versions:  # the next scene is larger: free the disk
        shutil.rmtree(str(built[name]) + ".partial", ignore_errors=True)
    shutil.rmtree(catalog.parent, ignore_errors=True)
    return {name: {"scene_px": size, "chip_size": chip, "chips": chips, "rounds": rs,
                   **{k: median([r[k] for r in rs]) for k in rs[0]}} for name, rs in measured.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", default="91704e6", help="the commit to compare with (its src/ in a git worktree)")
    ap.add_argument("--sizes", default="2048,4096,8192", help="synthetic scene sides in pixels: the chip counts")
    ap.add_argument("--chip-size", type=int, default=32, help="chip side in pixels, the same for every scene")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finalize.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_finalize_"))
    results = {name: [] for name in ("anchor", "this")}
    try:
        with anchor_worktree(args.anchor, tmp / "anchor") as anchor_src:
            versions = {"anchor": anchor_src, "this": ROOT / "src"}
            for size in [int(n) for n in args.sizes.split(",")]:
                for name, row in _scene(size, args.chip_size, args.rounds, versions, tmp).items():
                    results[name].append(row)
                print(f"[{size} px scene, {row['chips']} chips of {args.chip_size} px] " + "; ".join(
                    f"{n}: finalize {results[n][-1]['finalize_cpu_s']:.2f} CPU s, peak {results[n][-1]['peak_rss_bytes'] / 1e6:.0f} MB"
                    for n in versions), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for name, rows in results.items():
        cpu, mem = _slope(rows, "finalize_cpu_s"), _slope(rows, "peak_rss_bytes")
        summary[name] = {"cpu_s_per_1k_chips": round(cpu, 4), "peak_rss_mb_per_1k_chips": round(mem / 1e6, 2),
                         "m3leo_projection": {"finalize_cpu_hours": round(cpu * M3LEO_CHIPS / 1000 / 3600, 2),
                                              "finalize_peak_rss_gb": round((rows[-1]["peak_rss_bytes"]
                                                                             + mem * (M3LEO_CHIPS - rows[-1]["chips"]) / 1000) / 1e9, 1)}}
    most = {n: rows[-1] for n, rows in results.items()}
    result = {
        "benchmark": "bench_finalize", "machine": host(), "git_commit": git_commit(ROOT), "anchor": args.anchor,
        "chip_size": args.chip_size, "rounds": args.rounds, "results": results, "per_1k_chips": summary,
        "at_most_chips": {"chips": most["this"]["chips"],
                          "cpu_ratio_this_over_anchor": round(most["this"]["finalize_cpu_s"] / most["anchor"]["finalize_cpu_s"], 3),
                          "peak_rss_ratio_this_over_anchor": round(most["this"]["peak_rss_bytes"] / most["anchor"]["peak_rss_bytes"], 3)},
        "note": "the projection is a straight line from the measured slope: finalize in one process; CPU seconds "
                "from getrusage of the finalize call, peak RSS the finalize process's VmHWM (imports included)",
    }
    write_result(args.out, result, hide=("machine", "results"))


if __name__ == "__main__":
    sys.exit(main())

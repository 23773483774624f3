"""A unit runner's fixed cost: what every pipeline task or Indexed Job pod pays before its first unit,
this checkout against an anchor commit, side by side in one run.

    .venv/bin/python benchmarks/bench_startup.py [--anchor REV] [--rounds 10]

Each version plans a small synthetic scene and writes every unit once (its own build, its src from a
`git worktree`). Then every round runs `sarflow tile-unit STORE --unit 0 --force` in a new interpreter
per version, the versions interleaved: one unit of 16 chips of 32 px written again, whose warping and
encoding take a few hundredths of a second, so what it costs is the start-up (the interpreter, the
imports, the command line, the plan's state) and a writer's own imports. The child reports its own CPU
seconds (getrusage, the interpreter's start included), its wall time from its first line and which of
the heavy modules it imported. The worker's start-up is what keeps 2 workers under 2x one worker on
a small scene (`bench_scale.py`). Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from anchored import CHILD_HEAD, ROOT, anchor_worktree, build_store, median, scene_catalog, version_child
from machine import git_commit, host, write_result

HEAVY = ("zarr", "rasterio", "boto3", "pyarrow", "pyproj", "shapely", "pydantic", "pystac", "rich", "pandas",
         "geopandas", "torch")

# a child (PYTHONPATH: the version's src/): build the store, or run `tile-unit` on it and report
CHILD = CHILD_HEAD + r"""
elif step == "start":
    from sarflow.cli.main import app
    app(["tile-unit", store, "--unit", "0", "--force"], standalone_mode=False)
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime, "wall_s": time.perf_counter() - t0,
                      "imported": sorted(m for m in sys.argv[4].split(",") if m in sys.modules)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", default="eca5323", help="the commit to compare with (its src/ in a git worktree)")
    ap.add_argument("--size", type=int, default=384, help="synthetic scene side in pixels")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = ap.parse_args()

    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        catalog = scene_catalog(tmp / "scene", args.size, 32)
        with anchor_worktree(args.anchor, tmp / "anchor") as anchor_src:
            versions = {"anchor": anchor_src, "this": ROOT / "src"}
            built = {name: build_store(CHILD, src, str(tmp / f"{name}.zarr"), catalog, workers=1, shard_chips=16,
                                       unit_shards=1) for name, src in versions.items()}
            rounds = {name: [] for name in versions}
            for _ in range(args.rounds):
                for name, src in versions.items():  # interleaved: both versions under the same load
                    rounds[name].append(version_child(CHILD, src, "start", str(tmp / f"{name}.zarr"), ",".join(HEAVY)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {name: {k: round(median([r[k] for r in rs]), 3) for k in ("cpu_s", "wall_s")} for name, rs in rounds.items()}
    result = {
        "benchmark": "bench_startup", "machine": host(), "git_commit": git_commit(ROOT), "anchor": args.anchor,
        "scene_px": args.size, "units": built["this"]["units"], "rounds": rounds, "medians": medians,
        "imported": {name: rs[0]["imported"] for name, rs in rounds.items()},
        "cpu_ratio_this_over_anchor": round(medians["this"]["cpu_s"] / medians["anchor"]["cpu_s"], 3),
        "wall_ratio_this_over_anchor": round(medians["this"]["wall_s"] / medians["anchor"]["wall_s"], 3),
        "note": "sarflow tile-unit --unit 0 --force on a store whose units are all written (unit 0: 16 chips of "
                "32 px written again): the interpreter, the imports, the command line, the plan's state and one "
                "tiny unit; CPU from the child's own getrusage",
    }
    write_result(args.out, result, hide=("machine", "rounds"))


if __name__ == "__main__":
    main()

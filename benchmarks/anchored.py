"""What the benchmarks that run this checkout against an anchor commit share (bench_finalize,
bench_finalize_s3, bench_startup): the anchor's src/ in a `git worktree`, a synthetic scene's
catalog, a child interpreter that imports one version's sarflow and builds a store with it; and the
median of rounds, which bench_checksums uses too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The start of every child (`version_child`): this version's sarflow (asserted), the step and the store
# from argv, `t0` at its first line, and the step "build" (`build_store`). A benchmark's own steps
# follow it as `elif step == "...":`.
CHILD_HEAD = r"""
import time
t0 = time.perf_counter()
import json, resource, sys
from pathlib import Path
import sarflow
assert sarflow.__file__.startswith(sys.argv[1]), (sarflow.__file__, "PYTHONPATH did not take")
step, store = sys.argv[2], sys.argv[3]
if step == "build":
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions
    from sarflow.data.tile_units import plan, run_units
    options = json.loads(sys.argv[5])
    p = plan(load_catalog(Path(sys.argv[4])), store, TileOptions(checksum=False, overwrite=True, **options))
    run_units(store, workers=options["workers"])
    print(json.dumps({"units": len(p.units), "chips": p.total}))
"""


@contextmanager
def anchor_worktree(rev: str, where: Path):
    """The anchor commit checked out (detached) at `where`, yielding its src/; removed again on exit."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    try:
        yield where / "src"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True)


def version_child(code: str, src: Path, *args: str, env: dict | None = None) -> dict | None:
    """Runs `code` in a new interpreter whose sarflow is the one in `src` (PYTHONPATH ahead of the
    installed one), with argv `src, *args`; its last line of output parsed as JSON (None when it
    printed nothing). A failure stops the benchmark, naming the step (`args[0]`) and the version."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code, str(src), *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{args[0]} with {src} failed: {done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def build_store(child: str, src: Path, store: str, catalog: Path, env: dict | None = None, **options) -> dict:
    """Plans `catalog` into `store` with this version (`src`) and writes every unit, in a child running
    `child` (which starts with CHILD_HEAD); `options` are TileOptions (`workers` among them):
    {"units": ..., "chips": ...}."""
    return version_child(child, src, "build", store, str(catalog), json.dumps(options), env=env)


def scene_catalog(folder: Path, size: int, chip: int) -> Path:
    """A synthetic scene of `size` px a side in `folder` (`sarflow synth`, seed 5) and a catalog of it
    beside the scene's own, with chips of `chip` px."""
    import yaml

    from sarflow.data.synth import SynthConfig, synthesize

    scene = synthesize(folder, SynthConfig(size_px=size, seed=5))
    cat = yaml.safe_load(scene.read_text())
    cat["grid"]["chip_size"] = chip
    catalog = scene.with_name(f"catalog_{chip}.yaml")
    catalog.write_text(yaml.safe_dump(cat, sort_keys=False))
    return catalog


def median(values: list[float]) -> float:
    """The median of the rounds (the lower middle one of an even count)."""
    return sorted(values)[(len(values) - 1) // 2]

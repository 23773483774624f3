"""What the benchmarks that run this checkout against an anchor commit share (bench_finalize,
bench_finalize_s3): the anchor's src/ in a `git worktree`, a child interpreter that imports one
version's sarflow; and the median of rounds, which bench_checksums uses too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def median(values: list[float]) -> float:
    """The median of the rounds (the lower middle one of an even count)."""
    return sorted(values)[(len(values) - 1) // 2]

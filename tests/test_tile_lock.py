"""Issue 16: two `sarflow tile` runs on one output. The second used to adopt the first's build
folder, crash and leave a `.partial`; now it is refused at once naming the running one, and a
first run killed with SIGKILL leaves no lock that blocks the next (which resumes its build)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# run A: a real `sarflow tile` that stops (sleeps) right after writing its first unit
_HOLDER = """
import sys, time
import sarflow.data.tile_units as tu
write = tu.write_unit
def write_then_hang(*a, **k):
    r = write(*a, **k)
    time.sleep(600)
    return r
tu.write_unit = write_then_hang
from sarflow.cli.main import app
app(args=sys.argv[1:], prog_name="sarflow")
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _sarflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sarflow.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=ENV)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240  # a hang guard, not a timing assertion
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_tile_run_on_the_same_output_is_refused_and_a_killed_one_does_not_block(tiny_scene, tmp_path):
    out = tmp_path / "chips.zarr"
    partial, lock = Path(f"{out}.partial"), Path(f"{out}.lock")
    args = ["tile", str(tiny_scene), "--out", str(out), "--shard-chips", "16", "--unit-shards", "1", "--quiet"]
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    try:
        _wait_for(partial / "_build" / "units" / "000000.json", first)
        before = sorted(str(p.relative_to(partial)) for p in partial.rglob("*"))
        assert f"pid {first.pid}" in lock.read_text()

        second = _sarflow(*args)
        assert second.returncode == 2, second.stderr[-2000:]
        line = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"another tile run is building {out}" in line[0] and f"pid {first.pid}" in line[0], line
        assert "wait for it" in line[0]
        # the first run's build is untouched and still its own; no store appeared
        assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*")) == before
        assert not out.exists() and first.poll() is None

        # tile-plan on the same output is refused the same way
        plan = _sarflow("tile-plan", str(tiny_scene), "--out", str(out))
        assert plan.returncode == 2 and "another tile run is building" in plan.stderr, plan.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.exists()  # left by the killed run, but its lock died with it

    third = _sarflow(*args)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "chip store written" in third.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chips.zarr"]  # no .partial, no .lock
    from sarflow.data.chipstore import open_store

    assert open_store(out).n_chips == json.loads((out / "zarr.json").read_text())["attributes"]["chips"] > 0


def test_the_build_lock_is_reentrant_and_released(tmp_path):
    from sarflow.data.tile_units import build_lock
    from sarflow.errors import InputError

    out = tmp_path / "x.zarr"
    with build_lock(out):
        with build_lock(out):  # tile() holds it across plan(), which takes it too
            assert Path(f"{out}.lock").exists()
        assert Path(f"{out}.lock").exists()
        other = subprocess.run([sys.executable, "-c", "import sys; from sarflow.data.tile_units import build_lock\n"
                                f"build_lock({str(out)!r}).__enter__()"], capture_output=True, text=True, env=ENV)
        assert other.returncode != 0 and "another tile run is building" in other.stderr, other.stderr[-2000:]
        import threading

        refused = []

        def in_a_thread():
            try:
                build_lock(out).__enter__()
            except InputError as e:
                refused.append(str(e))

        t = threading.Thread(target=in_a_thread)
        t.start()
        t.join()
        assert refused and "another tile run is building" in refused[0]
    assert not Path(f"{out}.lock").exists()
    with build_lock(out):
        pass
    with build_lock(tmp_path / "new" / "deeper" / "x.zarr"):  # folders made for the output...
        assert (tmp_path / "new" / "deeper").is_dir()
    assert list(tmp_path.iterdir()) == []  # ...are removed when the run wrote nothing there
    with pytest.raises(InputError, match="cannot write into the output folder"):
        (tmp_path / "file").write_text("x")
        build_lock(tmp_path / "file" / "x.zarr").__enter__()

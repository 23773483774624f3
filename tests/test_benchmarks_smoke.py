"""The benchmarks cannot rot: the GPU script runs end to end on CPU with `--smoke`, and the
science benchmark's claim arithmetic gives the known answers on hand-made curves, and the feature
server benchmark runs both servers under load with `--quick`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_science():
    spec = importlib.util.spec_from_file_location("bench_science", ROOT / "benchmarks" / "bench_science.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(name, points):
    return [{"features": name, "n": n, "mean": m, "lo": m - w, "hi": m + w} for n, m, w in points]


def test_label_savings_and_claims_on_known_curves():
    sci = _bench_science()
    # the product's rule (label_efficiency.saving_against) against scratch with every label (n=100:
    # 0.75 [0.73, 0.77]): MAE clearly above it already at n=10 -> "at least" 10x: met
    rows = _rows("mae", [(10, 0.80, 0.02), (100, 0.90, 0.02)]) + _rows("scratch_cnn", [(10, 0.50, 0.02), (100, 0.75, 0.02)])
    le = {"rows": rows, "higher_is_better": True, "metric": "macro_f1"}
    s = sci.label_savings(rows, "mae", "scratch_cnn", True)
    assert (s["status"], s["saving"], s["n_to_match"]) == ("at least", 10, 10)
    assert sci.claim_label_savings(le, "mae", "scratch_cnn")["status"] == "met"
    # MAE's interval at n=10 overlaps scratch's: the crossing cannot be located -> not measurable
    wide = _rows("mae", [(10, 0.80, 0.10), (100, 0.90, 0.02)]) + _rows("scratch_cnn", [(10, 0.50, 0.02), (100, 0.75, 0.02)])
    assert sci.label_savings(wide, "mae", "scratch_cnn", True)["status"] == "not measurable"
    assert sci.claim_label_savings({**le, "rows": wide}, "mae", "scratch_cnn")["status"] == "not measurable"
    # clearly below at n=10, reaching scratch's full-label score from n=50 of 200: measured 4x: not met
    four = _rows("mae", [(10, 0.60, 0.02), (50, 0.80, 0.02), (200, 0.90, 0.02)]) + \
        _rows("scratch_cnn", [(10, 0.50, 0.02), (200, 0.75, 0.02)])
    s = sci.label_savings(four, "mae", "scratch_cnn", True)
    assert (s["status"], s["saving"], s["n_range"]) == ("measured", 4, [10, 50])
    assert sci.claim_label_savings({**le, "rows": four}, "mae", "scratch_cnn") | {"numbers": ""} == \
        {"status": "not met", "savings": 4, "numbers": ""}
    # lower is better (RMSE): clearly below scratch's full-label RMSE already at 25 labels of 250: >= 10x
    rmse = _rows("mae", [(25, 0.10, 0.005), (250, 0.08, 0.005)]) + _rows("scratch_cnn", [(25, 0.20, 0.01), (250, 0.12, 0.01)])
    s = sci.label_savings(rmse, "mae", "scratch_cnn", False)
    assert (s["status"], s["saving"]) == ("at least", 10)
    # MAE never reaches scratch's full-label score: none -> not met
    never = _rows("mae", [(10, 0.40, 0.01), (100, 0.60, 0.01)]) + _rows("scratch_cnn", [(10, 0.50, 0.01), (100, 0.75, 0.01)])
    assert sci.label_savings(never, "mae", "scratch_cnn", True)["status"] == "none"
    assert sci.claim_label_savings({**le, "rows": never}, "mae", "scratch_cnn")["status"] == "not met"
    # counts spanning less than 10x cannot measure a 10x claim
    short = _rows("mae", [(50, 0.8, 0.01), (200, 0.9, 0.01)]) + _rows("scratch_cnn", [(50, 0.5, 0.01), (200, 0.7, 0.01)])
    assert sci.claim_label_savings({**le, "rows": short}, "mae", "scratch_cnn")["status"] == "not measurable"
    # LLP and clouds
    assert sci.claim_llp({"best_model": "conv", "metrics": {"test_proportion_mae": 0.05, "baseline_mae": 0.1}})["status"] == "met"
    assert sci.claim_llp({"not_measurable": "x"})["status"] == "not measurable"
    ab = {"columns": ["wc_macro_f1"], "rows": [{"condition": "clouded", "modalities": m, "wc_macro_f1": v}
                                                for m, v in (("sar", 0.6), ("optical", 0.3), ("fused", 0.65))]}
    assert sci.claim_clouds(ab)["status"] == "met"
    ab["rows"][1]["wc_macro_f1"] = 0.7
    assert sci.claim_clouds(ab)["status"] == "not met"


def test_science_efficiency_rows_use_the_products_block_interval():
    """bench_science's curves: a fixed test set, the interval from label_efficiency.block_interval
    (blocks of the test chips), informative features ahead of noise at every n."""
    import numpy as np

    from sarflow.downstream.tasks import Task

    sci = _bench_science()
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 200)
    good = (y[:, None] * 2.0 + rng.normal(0, 0.5, (400, 4))).astype(np.float32)
    noise = rng.normal(0, 1, (400, 4)).astype(np.float32)
    split = np.array(["train"] * 300 + ["test"] * 100)
    blocks = np.arange(400) // 10  # 10 test blocks of 10 chips
    task = Task("t", "lab", "multiclass", "macro_f1", True, codes=(0, 1))
    rows = sci.efficiency(task, {"good": good, "noise": noise}, y, split == "train", split == "test", blocks,
                          [10, 50], draws=3, boot=200)
    got = {(r["features"], r["n"]): r for r in rows}
    assert set(got) == {(f, n) for f in ("good", "noise") for n in (10, 50, 300)}
    for r in rows:
        assert r["lo"] <= r["mean"] <= r["hi"] and r["n_test"] == 100 and r["test_blocks"] == 10
    for n in (10, 50, 300):
        assert got[("good", n)]["lo"] > got[("noise", n)]["hi"]


def test_gpu_script_smoke_runs_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--smoke", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_bench.json").read_text())
    assert res["smoke"] and res["device"] == "cpu"
    mae = res["mae"]
    # the reference is the same transformer: same parameter count, both trained, finite losses
    assert mae["sarflow"]["params_m"] == mae["reference"]["params_m"] > 0
    for impl in ("sarflow", "reference"):
        assert mae[impl]["chips_per_s"] > 0 and math.isfinite(mae[impl]["loss_last"])
    assert 0.5 < mae["sarflow"]["trivial_loss"] < 1.5  # predicting 0 on per-patch normalised targets: ~1
    assert mae["ratio_sarflow_over_reference"] > 0
    le = res["label_efficiency"]
    assert le["n_test"] >= 10 and {r["features"] for r in le["rows"]} == {"vit_mae", "vit_random", "pixel_stats"}
    for r in le["rows"]:
        assert r["lo"] <= r["mean"] <= r["hi"] or r["lo"] == pytest.approx(r["mean"])
    emb = res["embed"]
    assert emb["rc"] == 0, emb.get("stderr_tail")
    assert (out / "embed.json").is_file()


@pytest.mark.slow
def test_feature_server_bench_quick_runs_both_servers(tmp_path):
    """bench_feature_server.py --quick: Feast's default `feast serve` and sarflow's flags, each under
    real load on 127.0.0.1, in one JSON (no timing or error-rate threshold)."""
    from sarflow.local.services import feast_serve_flags

    out = tmp_path / "fs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_feature_server.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--duration", "2", "--workers", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["servers"]) == {"anchor", "sarflow"}
    for s in res["servers"].values():
        assert s["requests"] > 0 and s["ok"] > 0 and s["ok"] + s["errors"] == s["requests"]
        assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"] and s["throughput_rps"] > 0
        assert s["worker_recycled"] >= 0 and s["longest_gap_ms"] > 0 and s["p99_all_ms"] > 0 and "error_rate" in s
    # the anchor is Feast's defaults (host and port only); sarflow's is exactly its production flags
    anchor = res["servers"]["anchor"]["command"]
    assert [a for a in anchor[anchor.index("serve") + 1:] if not a.startswith(("--host=", "--port="))] == []
    ours = res["servers"]["sarflow"]["command"]
    assert ours[-len(feast_serve_flags(1)):] == feast_serve_flags(1) == res["config"]["sarflow_flags"]
    assert set(res["ratios_sarflow_over_anchor"]) >= {"p50", "p95", "p99", "throughput", "error_rate"}
    assert res["ratios_sarflow_over_anchor"]["throughput"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| anchor |" in md and "| sarflow |" in md


@pytest.mark.slow
def test_tile_bench_smoke_measures_the_floor(tmp_path):
    """bench_tile.py --smoke: sarflow tile (CLI and in-process) beside the floor of its design, on a
    512 px scene of 64 px chips. The floor encodes the same chunks with the store's own codec, so its
    encoded bytes are the store's shard bytes less the shard indexes and metadata (a few KiB per array)."""
    out = tmp_path / "tile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tile.py"), "--smoke", "--rounds", "2",
                           "--out", str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    (s,) = res["sizes"]
    assert (s["size_px"], s["chip_size"]) == (512, 64) and "skipped" in s["gdalwarp"]
    chips = s["sarflow"]["chips"]
    assert chips == s["sarflow_library"]["chips"] == s["floor"]["chips"] > 0
    fl = s["floor"]
    # every input file of every source warped once over the chips' grid
    assert len(fl["warp"]["files"]) == s["scene"]["input_files"]
    assert fl["warp"]["width"] % 64 == 0 and fl["warp"]["height"] % 64 == 0
    assert fl["warp"]["cpu_s"] > 0 and fl["encode"]["cpu_s"] > 0
    assert fl["cpu_s"] == pytest.approx(fl["warp"]["cpu_s"] + fl["encode"]["cpu_s"], abs=2e-3)
    for name, a in fl["encode"]["arrays"].items():
        assert 0 <= s["store"]["arrays"][name]["bytes"] - a["encoded_bytes"] < 16384, name
    steps = s["sarflow_library"]["steps"]
    assert set(steps) == {"plan", "units", "finalize"} and all(v["cpu_s"] > 0 for v in steps.values())
    r = s["ratios"]
    assert r["sarflow_cpu_over_floor"] == pytest.approx(s["sarflow"]["cpu_s"] / fl["cpu_s"], rel=1e-2)
    assert r["units_cpu_over_floor"] < r["library_cpu_over_floor"]
    # the projection: 10M chips of 448 px, hours divide by the workers
    h = s["m3leo_hours"]["library"]
    assert list(h) == ["16_workers", "64_workers", "256_workers", "1024_workers"]
    assert h["16_workers"] == pytest.approx(4 * h["64_workers"], rel=0.05) and h["1024_workers"] > 0
    goal = res["summary"]["goals"]["sarflow_cpu_within_1.2x_floor"]
    assert goal["goal"] == 1.2
    # two rounds of (tile, in-process, floor): the goal's value is the median of the rounds' own ratios
    assert len(s["rounds"]) == 2 and s["rounds"][0]["sarflow_cpu_over_floor"] == r["sarflow_cpu_over_floor"]
    assert all(x["floor_cpu_s"] > 0 and x["sarflow_cpu_s"] > 0 for x in s["rounds"])
    assert goal["value"]["512_c64"] == s["median_of_rounds"]["sarflow_cpu_over_floor"] == pytest.approx(
        sum(x["sarflow_cpu_over_floor"] for x in s["rounds"]) / 2, abs=1e-3)


def test_tile_bench_marginal_cost_per_chip_leaves_fixed_costs_out(monkeypatch):
    """Two scenes of one chip size: the extra CPU per extra chip. A fixed cost of 5 s on every sarflow
    run disappears from it; a per-chip cost of 0.12 against the floor's 0.1 gives 1.2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its siblings (cost.py, machine.py), as when run
    spec = importlib.util.spec_from_file_location("bench_tile", ROOT / "benchmarks" / "bench_tile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def scene(size, chips):
        return {"size_px": size, "chip_size": 256, "sarflow": {"chips": chips, "cpu_s": 5 + 0.12 * chips},
                "sarflow_library": {"cpu_s": 1 + 0.11 * chips}, "floor": {"cpu_s": 0.1 * chips}}

    got = mod.marginal_per_chip([scene(4096, 256), scene(2048, 81), {"size_px": 512, "chip_size": 64}])
    assert list(got) == ["256"] and got["256"]["between"] == ["2048_c256", "4096_c256"]
    assert got["256"]["extra_chips"] == 175
    assert got["256"]["sarflow_over_floor"] == pytest.approx(1.2) and got["256"]["library_over_floor"] == pytest.approx(1.1)
    # a scene run in rounds counts by the median CPU seconds of its rounds: a first round on a machine
    # 30 % slower (every part 1.3x) is outvoted by the two after it
    big = scene(4096, 256)
    rounds = [{"sarflow_cpu_s": k * big["sarflow"]["cpu_s"], "library_cpu_s": k * big["sarflow_library"]["cpu_s"],
               "floor_cpu_s": k * big["floor"]["cpu_s"]} for k in (1.3, 1.0, 1.0)]
    big["median_of_rounds"] = {key: sorted(r[key] for r in rounds)[1] for key in rounds[0]}
    again = mod.marginal_per_chip([big, scene(2048, 81)])
    assert again["256"]["sarflow_over_floor"] == pytest.approx(1.2) and again["256"]["cpu_s_per_chip"] == got["256"]["cpu_s_per_chip"]


def test_tile_bench_peak_rss_is_the_childs_own_not_the_benchmarks(monkeypatch, tmp_path):
    """wait4's ru_maxrss of a child includes the memory of the process that spawned it (Linux folds the
    pre-exec high-water mark into it): a 600 MB benchmark made every child look 600 MB. The peak is the
    child's VmHWM: here a child that touches 200 MB, frees it and idles."""
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_tile", ROOT / "benchmarks" / "bench_tile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    held = np.ones(600 << 17)  # 600 MB in this process
    child = "import numpy as np, time; x = np.ones(200 << 17); time.sleep(0.6); del x; time.sleep(0.6)"
    r = mod.run_measured([sys.executable, "-c", child], cwd=tmp_path, log_stem=tmp_path / "logs" / "c", timeout=60)
    assert r["rc"] == 0 and held.sum() > 0
    assert 200 << 20 <= r["peak_rss_bytes"] < 400 << 20  # wait4's ru_maxrss said >= 600 MB on this kernel


def test_scale_bench_runs_workers_as_processes_in_rounds(tmp_path):
    """bench_scale.py on a tiny scene: the units in 1 and 2 `sarflow tile-unit` processes and the
    plan's screening in 1 and 2 `tile-screen` processes, two rounds each, medians and speedups."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--size", "384", "--chip", "32",
                           "--workers", "1", "2", "--no-s3", "--plan-size", "384", "--rounds", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    runs = res["targets"]["local"]["runs"]
    assert [r["processes"] for r in runs] == [1, 2] and res["rounds"] == 2
    for r in runs:
        assert len(r["rounds_units_s"]) == 2 and r["units_s"] in r["rounds_units_s"]
        assert r["chips"] == runs[0]["chips"] > 0 and r["units_cpu_s"] > 0
    assert runs[1]["speedup"] == pytest.approx(runs[1]["units_chips_per_s"] / runs[0]["units_chips_per_s"], abs=0.01)
    plans = res["plan"]["runs"]
    assert [p["processes"] for p in plans] == [1, 2] and plans[0]["chips"] == plans[1]["chips"] > 0
    assert all(p["screen_s"] > 0 and len(p["rounds_plan_s"]) == 2 for p in plans)
    assert "m3leo_note" in res["targets"]["local"]


def test_checksum_bench_hashes_in_parts_and_resumes_without_hashing(tmp_path):
    """bench_checksums.py on a tiny scene: the survey hashing (anchor), resumed, and after 1 and 2
    `tile-checksum` processes, two rounds, medians."""
    out = tmp_path / "checksums.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_checksums.py"), "--size", "384",
                           "--rounds", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    med = res["median"]
    assert res["input_files"] > 1 and res["input_mb"] > 0 and res["rounds"] == 2
    assert set(med) == {"no_op_part", "survey_hashing", "survey_resumed", "parts_1", "parts_2"}
    assert all(len(m["rounds_s"]) == 2 and m["s"] in m["rounds_s"] and m["cpu_s"] > 0 for m in med.values())
    assert res["checksum_speedup"]["1"] == 1.0
    share = res["largest_part_share_of_bytes"]["2"]  # of two parts the larger holds at least half the bytes
    assert 0.5 <= share["by_bytes"] <= 1.0 and 0.5 <= share["by_file_count"] <= 1.0
    if res["mb_per_cpu_s"] is None:  # the tiny scene's hashing may be lost in the start-up's noise: nothing claimed
        assert res["minutes_per_tb_of_inputs"] is None
    else:
        minutes = res["minutes_per_tb_of_inputs"]
        assert res["mb_per_cpu_s"] > 0 and minutes["1_parts"] == pytest.approx(1e6 / res["mb_per_cpu_s"] / 60, rel=0.01)
        assert minutes["16_parts"] == pytest.approx(minutes["1_parts"] / 16, abs=0.01)


def _anchored_bench(tmp_path: Path, script: str, *args: str) -> dict:
    """Runs a benchmark that compares this checkout with its default anchor commit (skipped where the
    clone does not hold that commit) and returns the JSON it wrote."""
    anchor = re.search(r'"--anchor", default="(\w+)"', (ROOT / "benchmarks" / script).read_text())[1]
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{anchor}^{{commit}}"]).returncode:
        pytest.skip(f"the anchor commit {anchor} is not in this clone's history (shallow clone or sdist)")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT / "benchmarks", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_finalize_bench_compares_this_checkout_with_its_anchor(tmp_path):
    """bench_finalize.py on two tiny scenes, one round: both versions finalize every scene, the
    per-1,000-chip slopes and the ratios at the most chips are reported."""
    res = _anchored_bench(tmp_path, "bench_finalize.py", "--sizes", "384,512", "--chip-size", "32", "--rounds", "1")
    assert set(res["results"]) == {"anchor", "this"} and res["anchor"]
    for rows in res["results"].values():
        assert [r["scene_px"] for r in rows] == [384, 512] and rows[0]["chips"] < rows[1]["chips"]
        assert all(r["finalize_cpu_s"] > 0 and r["peak_rss_bytes"] > 50e6 and len(r["rounds"]) == 1 for r in rows)
    assert res["at_most_chips"]["chips"] == res["results"]["this"][1]["chips"]
    assert res["at_most_chips"]["cpu_ratio_this_over_anchor"] > 0
    assert set(res["per_1k_chips"]["this"]["m3leo_projection"]) == {"finalize_cpu_hours", "finalize_peak_rss_gb"}


@pytest.mark.slow
def test_finalize_s3_bench_measures_both_versions_behind_the_latency_proxy(tmp_path):
    """bench_finalize_s3.py on a tiny scene, one round: both versions finalize a copy of their build on
    moto through the proxy; wall, CPU and their ratios are reported, and each request paid the latency
    (a finalize of several units cannot take less than a few round trips)."""
    res = _anchored_bench(tmp_path, "bench_finalize_s3.py", "--size", "384", "--rounds", "1", "--latency-ms", "5")
    assert res["units"] >= 4 and res["chips"] > 0 and res["latency_ms"] == 5
    for name in ("anchor", "this"):
        assert len(res["rounds"][name]) == 1
        # every finalize went through the proxy: at least its three files of every unit were held
        assert res["rounds"][name][0]["requests_delayed"] >= 3 * res["units"]
        assert res["medians"][name]["finalize_cpu_s"] > 0
    assert res["wall_ratio_this_over_anchor"] > 0 and res["cpu_ratio_this_over_anchor"] > 0


def test_startup_bench_runs_a_unit_runner_of_both_versions(tmp_path):
    """bench_startup.py, one round: `sarflow tile-unit` of both versions starts, rewrites unit 0 and
    reports its CPU, wall and the heavy modules it imported; this version's runner, the command a pod
    runs, imports neither pystac nor rich nor pandas."""
    res = _anchored_bench(tmp_path, "bench_startup.py", "--rounds", "1")
    assert res["units"] >= 2 and set(res["rounds"]) == {"anchor", "this"}
    for name in ("anchor", "this"):
        assert len(res["rounds"][name]) == 1 and res["medians"][name]["cpu_s"] > 0.1
        assert {"zarr", "rasterio"} <= set(res["imported"][name])  # it did import what a unit needs
    assert not {"pystac", "rich", "pandas", "geopandas"} & set(res["imported"]["this"])
    assert res["cpu_ratio_this_over_anchor"] > 0 and res["wall_ratio_this_over_anchor"] > 0

"""The benchmarks cannot rot: the GPU script runs end to end on CPU with `--smoke`, and the
science benchmark's claim arithmetic gives the known answers on hand-made curves."""

from __future__ import annotations

import importlib.util
import json
import math
import os
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
    # MAE at 10 labels is as good as scratch at 100 (interval included): 10x; scratch never beats MAE
    rows = _rows("mae", [(10, 0.80, 0.02), (100, 0.90, 0.02)]) + _rows("scratch_cnn", [(10, 0.50, 0.02), (100, 0.75, 0.02)])
    le = {"rows": rows, "higher_is_better": True, "metric": "macro_f1"}
    s = sci.label_savings(rows, "mae", "scratch_cnn", True)
    assert s["ratio"] == 10 and s["n_ours"] == 10 and s["n_base"] == 100
    assert sci.claim_label_savings(le, "mae", "scratch_cnn")["status"] == "met"
    # the same curves with MAE's interval reaching below scratch's level: no longer counted
    wide = _rows("mae", [(10, 0.80, 0.10), (100, 0.90, 0.02)]) + _rows("scratch_cnn", [(10, 0.50, 0.02), (100, 0.75, 0.02)])
    assert sci.label_savings(wide, "mae", "scratch_cnn", True)["ratio"] == 1
    assert sci.claim_label_savings({**le, "rows": wide}, "mae", "scratch_cnn")["status"] == "not met"
    # lower is better (RMSE): the upper bound of MAE at 25 labels is at scratch's 250-label level: 10x
    rmse = _rows("mae", [(25, 0.10, 0.01), (250, 0.08, 0.01)]) + _rows("scratch_cnn", [(25, 0.20, 0.01), (50, 0.12, 0.01), (250, 0.11, 0.01)])
    assert sci.label_savings(rmse, "mae", "scratch_cnn", False)["ratio"] == 10
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

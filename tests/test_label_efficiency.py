"""Label-efficiency evaluation: intervals over spatial test blocks, curves on a problem with a
known answer, the scratch CNN's budget and validation optimum, label savings with uncertainty."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sarflow.downstream.estimators import output_metrics, weighted_metrics
from sarflow.downstream.label_efficiency import (block_interval, embedding_curve, label_savings, primary_figures,
                                                 summarize, spatial_blocks)
from sarflow.downstream.tasks import Task


def test_weighted_metrics_with_unit_weights_are_the_plain_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 5, 60))  # a class never true, one maybe never predicted
    w = np.ones((1, 60))
    for k, v in output_metrics("multiclass", y, pred).items():
        assert weighted_metrics("multiclass", y, pred, w)[k][0] == pytest.approx(v)
    yr = rng.normal(size=60)
    out = yr + rng.normal(scale=0.5, size=60)
    for k, v in output_metrics("regression", yr, out).items():
        assert weighted_metrics("regression", yr, out, w)[k][0] == pytest.approx(v)
    ym = (rng.random((60, 3)) < 0.3).astype(int)
    scores = np.round(ym + rng.normal(size=(60, 3)), 1)  # ties, grouped as sklearn groups them
    assert weighted_metrics("multilabel", ym, scores, w)["map"][0] == pytest.approx(
        output_metrics("multilabel", ym, scores)["map"])
    # weight 2 on a chip is the chip twice
    w2 = np.ones(60)
    w2[:10] = 2
    twice = np.r_[np.arange(60), np.arange(10)]
    assert weighted_metrics("regression", yr, out, w2[None])["rmse"][0] == pytest.approx(
        output_metrics("regression", yr[twice], out[twice])["rmse"])


def _blocks(n_blocks: int, per_block: int = 6) -> np.ndarray:
    return np.repeat(np.arange(n_blocks), per_block)


def test_block_interval_covers_the_truth_and_narrows_with_more_blocks():
    p = 0.7  # each test chip is right with probability p, a block shares a random effect
    rng = np.random.default_rng(1)

    def simulate(n_blocks):
        blocks = _blocks(n_blocks)
        block_p = np.clip(p + rng.normal(scale=0.1, size=n_blocks), 0, 1)
        right = rng.random(len(blocks)) < block_p[blocks]
        y = rng.integers(0, 2, len(blocks))
        return y, np.where(right, y, 1 - y), blocks

    covered, widths = {10: [], 80: []}, {10: [], 80: []}
    for n_blocks in (10, 80):
        for i in range(40):
            y, pred, blocks = simulate(n_blocks)
            lo, hi = block_interval("multiclass", y, [pred], blocks, replicates=300, seed=i)["accuracy"]
            covered[n_blocks].append(lo <= p <= hi)
            widths[n_blocks].append(hi - lo)
    assert np.mean(covered[10]) >= 0.8 and np.mean(covered[80]) >= 0.85
    assert np.mean(widths[80]) < 0.5 * np.mean(widths[10])  # ~ 1/sqrt(8)
    # one block cannot give an interval
    assert block_interval("multiclass", y[:6], [pred[:6]], np.zeros(6, int)) == {}


def test_spatial_blocks_split_the_splitters_blocks_when_there_are_too_few():
    ix, iy = np.meshgrid(np.arange(8), np.arange(4))
    cells = np.stack([ix.ravel(), iy.ravel()], axis=1)
    ids, side = spatial_blocks(cells, 1, min_blocks=8)  # side 1 from the splitter: 4 tried first; 2 blocks of 4x4, 6 of 3x3, 8 of 2x2
    assert side == 2 and ids.max() + 1 == 8 and np.bincount(ids).tolist() == [4] * 8
    ids, side = spatial_blocks(cells, 4, min_blocks=2)
    assert side == 4 and ids.max() + 1 == 2
    ids, side = spatial_blocks(cells, 4, min_blocks=6)  # the largest side that gives enough blocks
    assert side == 3 and ids.max() + 1 == 6


def _known_answer_data(sigma: float, d: int = 4):
    """ProbeData whose vegetation-like target is a known linear function of the embeddings plus
    noise of std sigma: the best possible test RMSE is sigma (OLS on n chips: sigma * sqrt(1 + d / (n - d - 1)))."""
    from sarflow.downstream.probes import ProbeData

    rng = np.random.default_rng(0)
    side = 30  # 900 chips on a 30 x 30 grid: rows 0-19 train, 20-23 val, 24-29 test
    ix, iy = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([ix.ravel(), iy.ravel()], axis=1)
    split = np.where(cells[:, 1] < 20, "train", np.where(cells[:, 1] < 24, "val", "test")).astype(object)
    x = rng.normal(size=(side * side, d)).astype(np.float32)
    target = x @ np.array([1.0, -2.0, 0.5, 1.5])[:d] + sigma * rng.normal(size=side * side) + 50
    labels = pd.DataFrame({"veg": target})
    return ProbeData(np.arange(side * side).astype(str), split, np.arange(side * side), x, labels,
                     cells.astype(float), cells, "m", "1", "v")


def test_curve_interval_covers_the_known_answer():
    from sarflow.downstream.probes import ProbeConfig, TaskSplits, _curves, curve_intervals

    sigma, d = 1.0, 4
    data = _known_answer_data(sigma, d)
    task = Task("veg", "veg", "regression", "rmse", False)
    y = data.labels["veg"].to_numpy()
    idx = {s: np.flatnonzero(data.split == s) for s in ("train", "val", "test")}
    ts = TaskSplits(task, y, idx, None, None)
    cfg = ProbeConfig(store="s", features_root="r", sizes=(25, 100, 0), draws=4, baselines=(), probes=("linear",))
    curves = _curves(cfg, data, [ts], set(), None, None)
    intervals, units = curve_intervals(curves, data, [ts], block_side=1, replicates=400)  # splitter: 1 chip
    # 6 x 30 test chips: 4 x 4 blocks (the smallest side tried first), cut by the grid into 2 x 8 = 16
    assert units["veg"] == {"blocks": 16, "block_chips": 4, "test_chips": 180}
    summary = summarize(curves.points, intervals)
    curve = embedding_curve(summary, task)
    assert [c["n"] for c in curve] == [25, 100, 600] and [c["draws"] for c in curve] == [4, 4, 1]
    for c in curve:
        expected = sigma * np.sqrt(1 + d / (c["n"] - d - 1))
        assert c["ci_low"] <= expected <= c["ci_high"], c
        assert c["ci_high"] - c["ci_low"] < 0.5
    top = primary_figures(summary, [task])["veg"]
    assert top["value"] == curve[-1]["mean"] and top["ci"] == [curve[-1]["ci_low"], curve[-1]["ci_high"]]
    assert top["ci"][0] <= sigma <= top["ci"][1]


def _summary(points: dict[str, list[tuple[int, float, float, float]]]) -> pd.DataFrame:
    """A curves summary: source -> [(n, mean, ci_low, ci_high)] of a higher-is-better task 't'."""
    rows = []
    for source, pts in points.items():
        probe = "cnn" if source == "scratch" else "linear"
        n_all = max(n for n, *_ in pts)
        for n, mean, lo, hi in pts:
            for split in ("val", "test"):
                rows.append({"task": "t", "source": source, "probe": probe, "n": n, "is_all": n == n_all,
                             "split": split, "metric": "macro_f1", "mean": mean, "std": 0.0, "draws": 3,
                             "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


TASK = Task("t", "t", "multiclass", "macro_f1", True)


def test_label_savings_read_not_measurable_when_the_intervals_overlap():
    s = _summary({"embeddings": [(25, 0.60, 0.45, 0.75), (100, 0.65, 0.50, 0.80), (400, 0.70, 0.55, 0.85)],
                  "pixel_stats": [(25, 0.6, 0.5, 0.7), (400, 0.68, 0.55, 0.80)]})
    got = label_savings(s, [TASK])["t"]["pixel_stats"]
    assert got["status"] == "not measurable" and got["saving"] is None and got["n_to_match"] is None
    assert got["baseline_all"] == 0.68 and got["baseline_ci"] == [0.55, 0.80]


def test_label_savings_measured_none_and_at_least():
    emb = [(25, 0.50, 0.45, 0.55), (100, 0.81, 0.77, 0.85), (400, 0.85, 0.82, 0.88)]
    s = _summary({"embeddings": emb, "scratch": [(25, 0.4, 0.35, 0.45), (400, 0.80, 0.77, 0.83)],
                  "pixel_stats": [(400, 0.95, 0.93, 0.97)], "random_init": [(400, 0.30, 0.25, 0.35)]})
    got = label_savings(s, [TASK])["t"]
    assert got["scratch"]["status"] == "measured" and got["scratch"]["n_to_match"] == 100
    assert got["scratch"]["saving"] == 4 and got["scratch"]["n_range"] == [25, 100]
    assert got["pixel_stats"]["status"] == "none"  # clearly below even with every label
    assert got["random_init"]["status"] == "at least" and got["random_init"]["n_to_match"] == 25
    # no interval (too few test blocks): not measurable, whatever the means say
    nan = _summary({"embeddings": [(25, 0.9, np.nan, np.nan), (400, 0.95, np.nan, np.nan)],
                    "scratch": [(400, 0.5, 0.4, 0.6)]})
    assert label_savings(nan, [TASK])["t"]["scratch"]["status"] == "not measurable"
    # lower is better (rmse): mirrored
    rmse = Task("t", "t", "regression", "rmse", False)
    s2 = _summary({"embeddings": [(25, 3.0, 2.8, 3.2), (100, 1.04, 0.98, 1.1), (400, 1.0, 0.95, 1.05)],
                   "scratch": [(400, 1.05, 1.0, 1.1)]}).assign(metric="rmse")
    got = label_savings(s2, [rmse])["t"]["scratch"]
    assert got["status"] == "measured" and got["n_to_match"] == 100
    # a curve below the baseline's score with every label saves nothing, whatever its intervals
    s3 = _summary({"embeddings": [(25, 0.36, 0.25, 0.52), (50, 0.51, 0.30, 0.69), (400, 0.68, 0.56, 0.75)],
                   "scratch": [(400, 0.84, 0.67, 0.95)]})
    assert label_savings(s3, [TASK])["t"]["scratch"]["status"] == "none"
    # reaching the score with no smaller n clearly below: the crossing cannot be located
    s4 = _summary({"embeddings": [(25, 0.78, 0.70, 0.86), (100, 0.82, 0.78, 0.86), (400, 0.9, 0.86, 0.94)],
                   "scratch": [(400, 0.80, 0.77, 0.83)]})
    assert label_savings(s4, [TASK])["t"]["scratch"]["status"] == "not measurable"


def test_scratch_cnn_has_the_same_step_budget_and_reaches_its_validation_optimum():
    import torch

    from sarflow.downstream.baselines import ScratchCNN

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    def chips(n):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 2, 8, 8)).astype(np.float32)
        x[:, 0, 2:6, 2:6] += np.where(y == 1, 1.0, -1.0)[:, None, None]  # a bright or dark square: the class
        return x, y

    x, y = chips(48)
    xv, yv = chips(64)
    cnn = ScratchCNN("multiclass", steps=60, eval_every=4, patience=4, seed=0)
    assert cnn.epochs_for(25) == 60 and cnn.epochs_for(320) == 6  # 1 vs 10 batches per epoch: the same steps
    cnn.fit(x, y, xv, yv)
    val = output_metrics("multiclass", yv, cnn.predict(xv))["macro_f1"]
    assert val == pytest.approx(cnn.best_val_) == pytest.approx(max(h["val"] for h in cnn.history_))  # model choice
    longer = ScratchCNN("multiclass", steps=160, eval_every=4, patience=10 ** 6, seed=0).fit(x, y, xv, yv)
    assert longer.steps_ == 160  # ran the whole budget
    assert val >= max(h["val"] for h in longer.history_) - 1e-9  # early stopping reached the optimum of a longer run
    assert val > 0.9
    # without a validation set it runs its budget and keeps the last state
    plain = ScratchCNN("multiclass", steps=30, seed=0).fit(x, y)
    assert plain.steps_ == 30 and plain.best_step_ is None

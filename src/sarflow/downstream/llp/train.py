"""Training on bag proportions only: the bag loss (KL, MSE or cross-entropy between predicted and
known bag proportions), full-batch training, the number of steps chosen on held-out training bags
(whose proportion MAE also ranks the models: validation, never the test chips), every model fit
and scored on the test chips (`fit_and_evaluate`), and the bag-size curve."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from sarflow.downstream.llp.bags import bag_matrix
from sarflow.downstream.llp.config import MODELS
from sarflow.downstream.llp.data import LLPData, merge_bags, subset_bags
from sarflow.downstream.llp.kdm import KDM
from sarflow.downstream.llp.metrics import evaluate_proportions, pixel_scores
from sarflow.downstream.llp.models import InstanceClassifier, StridedConvLLP
from sarflow.errors import InputError

log = logging.getLogger(__name__)


def bag_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Loss between predicted (bags, classes) and known bag proportions."""
    eps = 1e-6
    if kind == "kl":
        return (target * ((target + eps).log() - (pred + eps).log())).sum(dim=-1).mean()
    if kind == "mse":
        return ((pred - target) ** 2).sum(dim=-1).mean()
    if kind == "ce":
        return -(target * (pred + eps).log()).sum(dim=-1).mean()
    raise ValueError(f"unknown bag loss {kind!r}: kl, mse or ce")


def train_llp(model: nn.Module, x: torch.Tensor, a: torch.Tensor, target: torch.Tensor, loss: str = "kl",
              steps: int = 300, lr: float = 0.05, seed: int = 0, num_threads: int | None = 1,
              after_step=None) -> list[float]:
    """Full-batch training on bag proportions: bag predictions are A @ p(y | x).

    `num_threads` caps torch's CPU threads while training (restored after): these models are
    tiny, and on a shared CPU more threads only contend (10-50x slower); None leaves it.
    `after_step(step, model)` is called after every optimizer step (1-based)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        for step in range(1, steps + 1):
            pred = a @ model.instance(x)
            value = bag_loss(pred, target, loss)
            opt.zero_grad()
            value.backward()
            opt.step()
            history.append(value.item())
            if after_step is not None:
                after_step(step, model)
    finally:
        torch.set_num_threads(threads)
    return history


class StepChoice(NamedTuple):
    steps: int  # the step with the lowest held-out bag loss (or the given steps when none is held out)
    curve: list  # [(step, held-out bag loss)]
    val_mae: float  # held-out bag proportion MAE at `steps` (NaN when none is held out)
    val_bags: int  # bags held out


def held_out_bags(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(val, fit) bag positions: a seeded random `val_fraction` of `n` bags held out; None when
    fewer than two bags would be left to fit on (or nothing is held out)."""
    if val_fraction <= 0:
        return None
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 2:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_val], order[n_val:]


def select_steps(make_model, x: torch.Tensor, a: torch.Tensor, target: torch.Tensor, loss: str = "kl",
                 steps: int = 300, lr: float = 0.05, seed: int = 0, val_fraction: float = 0.25,
                 every: int = 10) -> StepChoice:
    """Early stopping from bag proportions alone (no chip label): a fresh `make_model()` is
    trained on a random (1 - val_fraction) of the bags (rows of `a`) and its loss on the
    held-out bags is read every `every` steps; returns the step with the lowest held-out loss
    (refit on every bag for that many steps), the curve [(step, loss)], the held-out bags'
    proportion MAE at that step (what models are compared by) and how many bags were held out.
    With fewer than two bags to fit on it returns `steps`, no curve and NaN."""
    split = held_out_bags(a.shape[0], val_fraction, seed)
    if split is None:
        return StepChoice(steps, [], float("nan"), 0)
    val, fit = split
    curve: list[tuple[int, float]] = []
    mae: dict[int, float] = {}

    def held_out(step: int, model: nn.Module) -> None:
        if step % every == 0 or step == steps:
            with torch.no_grad():
                pred = a[val] @ model.instance(x)
                curve.append((step, bag_loss(pred, target[val], loss).item()))
                mae[step] = (pred - target[val]).abs().mean().item()

    train_llp(make_model(), x, a[fit], target[fit], loss=loss, steps=steps, lr=lr, seed=seed, after_step=held_out)
    best = min(curve, key=lambda c: c[1])[0]
    return StepChoice(best, curve, mae[best], len(val))


def _make_model(name: str, x_train: torch.Tensor, k: int, hidden: int, prototypes: int,
                stride: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "linear":
        return InstanceClassifier(x_train.shape[1], k)
    if name == "mlp":
        return InstanceClassifier(x_train.shape[1], k, hidden=hidden)
    if name == "kdm":
        return KDM.from_data(x_train, k, n_prototypes=prototypes, seed=seed)
    if name == "conv":
        return StridedConvLLP(x_train.shape[1], k, stride=stride)
    raise InputError("models", f"unknown LLP model {name!r}: one of {list(MODELS)}")


def fit_and_evaluate(data: LLPData, models: tuple[str, ...], train_bags: list[str], test_rows: np.ndarray, *,
                     loss: str = "kl", steps: int = 300, lr: float = 0.03, hidden: int = 32, prototypes: int = 48,
                     stride: int = 8, seed: int = 0, num_threads: int = 1, val_fraction: float = 0.25) -> dict:
    """Trains every model on the training bags' proportions; scores each on the test chips.
    With `val_fraction` > 0 the number of steps (at most `steps`) is chosen on held-out
    training bags first (`select_steps`: bag proportions only), then the model is refit on
    every training bag. Returns {name: {"model", "metrics", "pred" (all rows), "coarse"
    (conv), "seconds"}}."""
    bags = subset_bags(data.bags, train_bags)
    k = len(data.classes)
    in_bags = data.chips["index"].astype(int).isin(set(bags.members["index"].astype(int))).to_numpy()
    in_bags[test_rows] = False  # test chips never enter a training bag (with split="store" they are dropped from it)
    if data.input_valid is not None:
        in_bags &= data.input_valid  # a chip without input data says nothing about its bag
    rows = np.flatnonzero(in_bags)
    row_of = {int(data.chips["index"].iloc[r]): j for j, r in enumerate(rows)}
    a, ids = bag_matrix(bags, len(rows), row_of)
    nonempty = (a.sum(dim=1) > 0).numpy()
    a, ids = a[nonempty], [b for b, keep in zip(ids, nonempty) if keep]
    if not ids:
        raise InputError("bags", "no training bag has a training chip")
    target = torch.tensor(bags.proportions.loc[ids].to_numpy(np.float64), dtype=torch.float32)
    mean_prop = target.mean(dim=0).numpy()
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))  # tiny full-batch models: more threads only contend
    try:
        for name in models:
            _fit_one(name, data, out, rows, a, target, mean_prop, test_rows, k, loss, steps, lr, hidden, prototypes,
                     stride, seed, val_fraction)
    finally:
        torch.set_num_threads(threads)
    out["_mean_prop"] = mean_prop
    return out


def _fit_one(name, data, out, rows, a, target, mean_prop, test_rows, k, loss, steps, lr, hidden, prototypes, stride,
             seed, val_fraction) -> None:
    """Trains one model on the bag matrix `a` and scores it on the test rows (into out[name])."""
    t0 = time.perf_counter()
    if name == "conv":
        if data.pixels is None:
            raise InputError("models", "the conv model needs pixels")
        x_all = torch.from_numpy(data.pixels)
    else:
        if data.features is None:
            raise InputError("models", f"the {name} model needs chip features")
        x_all = torch.from_numpy(data.features)
    x_train = x_all[rows]

    def make():
        return _make_model(name, x_train, k, hidden, prototypes, stride, seed)

    choice = select_steps(make, x_train, a, target, loss=loss, steps=steps, lr=lr, seed=seed, val_fraction=val_fraction)
    chosen, curve = choice.steps, choice.curve
    model = make()
    history = train_llp(model, x_train, a, target, loss=loss, steps=chosen, lr=lr, seed=seed)
    model.eval()
    with torch.no_grad():
        pred = model.instance(x_all).numpy()
        coarse = model.coarse_map(x_all).numpy() if name == "conv" else None
    metrics = evaluate_proportions(pred[test_rows], data.truth[test_rows], mean_prop)
    metrics["final_loss"] = history[-1]
    metrics["steps"] = chosen
    if curve:
        metrics["val_bag_loss"] = min(v for _, v in curve)
        metrics["val_bag_mae"] = choice.val_mae
    metrics["val_bags"] = choice.val_bags
    if coarse is not None and data.truth_map is not None:
        metrics.update(pixel_scores(coarse[test_rows], data.truth_map[test_rows], k))
    out[name] = {"model": model, "metrics": metrics, "pred": pred, "coarse": coarse,
                 "seconds": time.perf_counter() - t0}
    log.info("LLP %s: %d steps, held-out bag MAE %.4f; test MAE %.4f (baseline %.4f), in %.1fs", name, chosen,
             choice.val_mae, metrics["proportion_mae"], metrics["baseline_mae"], out[name]["seconds"])


def bag_size_curve(data: LLPData, train_bags: list[str], test_rows: np.ndarray, factors, model: str,
                   done: dict | None = None, **kw) -> pd.DataFrame:
    """Test MAE vs bag size: training bags merged `factor` at a time (`done`: results of
    fit_and_evaluate on the original bags, reused for factor 1)."""
    rows = []
    for f in factors:
        merged = merge_bags(data, train_bags, int(f), seed=kw.get("seed", 0))
        sizes = merged.members.groupby("bag_id")["area_fraction"].sum()
        if int(f) <= 1 and done is not None and model in done:
            res = done[model]["metrics"]
        else:
            sub = LLPData(**{**data.__dict__, "bags": merged})
            res = fit_and_evaluate(sub, (model,), sorted(merged.proportions.index), test_rows, **kw)[model]["metrics"]
        rows.append({"merge_factor": int(f), "bags": int(len(merged.proportions)), "mean_chips_per_bag": float(sizes.mean()),
                     "model": model, "proportion_mae": res["proportion_mae"], "baseline_mae": res["baseline_mae"],
                     "f1_macro": res["f1_macro"]})
    return pd.DataFrame(rows)

"""Learning from label proportions: only the class proportions of bags (the chips of a
municipality, from statistics tables) are known; a chip-level model is trained so that the
weighted mean of its predictions over each bag matches the bag's proportions.

- `chip_bags`: chips x municipality polygons, with area weights for chips on borders;
- `bag_loss`: KL, MSE or cross-entropy between predicted and known bag proportions;
- models: `InstanceClassifier` (linear or MLP on embeddings), `KDM` (kdm.py), and
  `StridedConvLLP` (a strided convolution + 1x1 softmax on pixels, ~5k parameters, which
  yields a coarse segmentation);
- `evaluate_proportions`: per-chip proportion MAE against fine labels, next to the baseline
  that predicts the mean proportions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
import torch
import torch.nn.functional as F
from torch import nn

from sarflow.errors import InputError


@dataclass
class Bags:
    members: pd.DataFrame  # chip_id, index, bag_id, weight (a chip's weights sum to 1), area_fraction
    outside: list[str]  # chips in no polygon: reported, not dropped silently
    proportions: pd.DataFrame  # bag_id -> class proportion columns


def chip_bags(chips: pd.DataFrame, grid_crs: str, polygons, id_column: str, stats: pd.DataFrame,
              classes: list[int], *, polygons_source: str = "bag polygons",
              stats_source: str = "bag statistics") -> Bags:
    """Intersects chips (minx..maxy in the grid CRS) with bag polygons (a GeoDataFrame).

    `polygons_source` / `stats_source` name the files in error messages."""
    if id_column not in polygons.columns:
        raise InputError(polygons_source, f"the polygons have no column {id_column!r} (they have {list(polygons.columns)})")
    if id_column not in stats.columns:
        raise InputError(stats_source, f"the statistics have no column {id_column!r} (they have {list(stats.columns)})")
    polys = polygons.to_crs(grid_crs)
    boxes = shapely.box(chips["minx"].to_numpy(), chips["miny"].to_numpy(), chips["maxx"].to_numpy(), chips["maxy"].to_numpy())
    area = shapely.area(boxes)
    tree = shapely.STRtree(polys.geometry.values)
    box_idx, poly_idx = tree.query(boxes, predicate="intersects")
    inter = shapely.area(shapely.intersection(boxes[box_idx], polys.geometry.values[poly_idx]))
    df = pd.DataFrame({"pos": box_idx, "bag_id": polys[id_column].to_numpy()[poly_idx], "area_fraction": inter / area[box_idx]})
    df = df[df.area_fraction > 1e-9]
    covered = df.groupby("pos")["area_fraction"].transform("sum")
    df["weight"] = df.area_fraction / covered
    df["chip_id"] = chips["chip_id"].to_numpy()[df.pos]
    df["index"] = chips["index"].to_numpy()[df.pos]
    outside = sorted(set(chips["chip_id"]) - set(df.chip_id))
    cols = [f"frac_{c}" for c in classes]
    missing = [c for c in cols if c not in stats.columns]
    if missing:
        raise InputError(stats_source, f"missing proportion columns {missing}")
    stats = stats.assign(**{id_column: stats[id_column].astype(str)})
    df["bag_id"] = df["bag_id"].astype(str)
    props = stats.set_index(id_column)[cols].fillna(0.0)
    props = props.div(props.sum(axis=1).replace(0, 1), axis=0)
    unknown = sorted(set(df.bag_id) - set(props.index))
    if unknown:
        raise InputError(stats_source, f"no proportions for bag(s) {unknown[:5]}")
    return Bags(members=df[["chip_id", "index", "bag_id", "weight", "area_fraction"]].reset_index(drop=True),
                outside=outside, proportions=props)


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


class InstanceClassifier(nn.Module):
    """Linear (hidden=0) or MLP classifier on chip embeddings; softmax outputs."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0):
        super().__init__()
        self.net = nn.Linear(dim, n_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def instance(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.instance(x)


class StridedConvLLP(nn.Module):
    """A strided convolution and a 1x1 softmax: per-patch class probabilities (a coarse map);
    a chip's proportions are the mean over its patches."""

    def __init__(self, in_chans: int, n_classes: int, stride: int = 8, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, hidden, kernel_size=stride, stride=stride)
        self.head = nn.Conv2d(hidden, n_classes, kernel_size=1)

    def coarse_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.head(F.relu(self.conv(x))), dim=1)

    def instance(self, x: torch.Tensor) -> torch.Tensor:
        return self.coarse_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.instance(x)


def bag_matrix(bags: Bags, n_rows: int, row_of: dict[int, int]) -> tuple[torch.Tensor, list[str]]:
    """(bags, rows) matrix of normalised membership weights: bag prediction = A @ instance predictions.

    A chip contributes to a bag in proportion to its area inside the bag polygon (its
    `area_fraction`): a border chip half inside counts half."""
    m = bags.members
    ids = sorted(m.bag_id.unique())
    pos = {b: i for i, b in enumerate(ids)}
    keep = m["index"].map(lambda i: int(i) in row_of).to_numpy(bool)
    m = m[keep]
    a = torch.zeros(len(ids), n_rows, dtype=torch.float64)
    rows = torch.tensor([row_of[int(i)] for i in m["index"]], dtype=torch.long)
    cols = torch.tensor([pos[b] for b in m["bag_id"]], dtype=torch.long)
    a.index_put_((cols, rows), torch.tensor(m["area_fraction"].to_numpy(np.float64)), accumulate=True)
    a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return a.float(), ids


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


def select_steps(make_model, x: torch.Tensor, a: torch.Tensor, target: torch.Tensor, loss: str = "kl",
                 steps: int = 300, lr: float = 0.05, seed: int = 0, val_fraction: float = 0.25,
                 every: int = 10) -> tuple[int, list[tuple[int, float]]]:
    """Early stopping from bag proportions alone (no chip label): a fresh `make_model()` is
    trained on a random (1 - val_fraction) of the bags (rows of `a`) and its loss on the
    held-out bags is read every `every` steps; returns the step with the lowest held-out loss
    (refit on every bag for that many steps) and the curve [(step, loss)]. With fewer than two
    bags to fit on it returns `steps`."""
    n = a.shape[0]
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 2:
        return steps, []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, fit = order[:n_val], order[n_val:]
    curve: list[tuple[int, float]] = []

    def held_out_loss(step: int, model: nn.Module) -> None:
        if step % every == 0 or step == steps:
            with torch.no_grad():
                curve.append((step, bag_loss(a[val] @ model.instance(x), target[val], loss).item()))

    train_llp(make_model(), x, a[fit], target[fit], loss=loss, steps=steps, lr=lr, seed=seed, after_step=held_out_loss)
    best = min(curve, key=lambda c: c[1])[0]
    return best, curve


def evaluate_proportions(pred: np.ndarray, truth: np.ndarray, train_bag_mean: np.ndarray) -> dict:
    """Per-chip proportion MAE of the model and of the mean-proportion baseline; chip-level
    macro F1/IoU of the majority class."""
    from sklearn.metrics import f1_score, jaccard_score

    mae = float(np.abs(pred - truth).mean())
    base = float(np.abs(train_bag_mean[None] - truth).mean())
    y, yhat = truth.argmax(1), pred.argmax(1)
    labels = np.unique(y)
    return {"proportion_mae": mae, "baseline_mae": base, "improvement": base - mae,
            "f1_macro": float(f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "iou_macro": float(jaccard_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "baseline_f1_macro": float(f1_score(y, np.full_like(y, train_bag_mean.argmax()), labels=labels,
                                                average="macro", zero_division=0))}

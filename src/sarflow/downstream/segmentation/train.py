"""Training a segmentation model (AdamW, cosine schedule, flips and rotations), prediction, scores on
the val or test chips and the majority-class baseline."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sarflow.downstream.segmentation.config import SegmentConfig
from sarflow.downstream.segmentation.data import SegData
from sarflow.downstream.segmentation.metrics import IGNORE, confusion_matrix, segmentation_scores
from sarflow.downstream.segmentation.models import Segmenter, UNet, ViTSegmenter


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip and 90-degree rotation for the whole batch's inputs and labels."""
    k = int(torch.randint(4, (1,), generator=gen))
    if torch.rand(1, generator=gen) < 0.5:
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    if k:
        x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    return x, y


def train_model(model: Segmenter, x: torch.Tensor, y: torch.Tensor, cfg: SegmentConfig,
                encoder_params: list[nn.Parameter] | None = None) -> list[float]:
    """AdamW with a cosine schedule on random batches; returns the loss of every step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    enc_ids = {id(p) for p in encoder_params or []}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    param_groups = [{"params": head, "lr": cfg.lr}]
    enc = [p for p in encoder_params or [] if p.requires_grad]
    if enc:
        param_groups.append({"params": enc, "lr": cfg.lr * cfg.encoder_lr_scale})
    opt = torch.optim.AdamW(param_groups, weight_decay=1e-4)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, cfg.steps // 20)
    losses = []
    model.train()
    n = len(x)
    for step in range(cfg.steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * scale
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
        xb, yb = x[idx], y[idx]
        if cfg.augment:
            xb, yb = _augment(xb, yb, gen)
        loss = F.cross_entropy(model.logits(xb), yb, ignore_index=IGNORE)
        if not torch.isfinite(loss):  # a batch with no labelled pixel
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict_indices(model: Segmenter, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model.logits(x[i:i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


def evaluate(model: Segmenter, data: SegData, split: str = "test") -> dict:
    """Scores on the `split` chips ("val" or "test") of `data`."""
    x, y = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    pred = predict_indices(model, x)
    cm = confusion_matrix(y.numpy(), pred.numpy(), len(data.classes))
    s = segmentation_scores(cm)
    return {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"],
            "iou": {c: v for c, v in zip(data.classes, s["iou"])}, "confusion": cm.tolist(), "pred": pred}


def majority_baseline(data: SegData) -> dict:
    """Scores of predicting the most frequent train class everywhere."""
    y = data.y_train.numpy()
    counts = np.bincount(y[y != IGNORE], minlength=len(data.classes))
    k = int(counts.argmax())
    cm = confusion_matrix(data.y_test.numpy(), np.full(data.y_test.shape, k), len(data.classes))
    s = segmentation_scores(cm)
    return {"class": data.classes[k], "miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"]}


def subset(data: SegData, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(data.x_train)
    k = max(1, int(round(n * fraction)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:k]
    return data.x_train[idx], data.y_train[idx]


def _build(kind: str, cfg: SegmentConfig, data: SegData, encoder_state=None):
    """A fresh model of `kind`, and the encoder parameters to train at the lower lr."""
    torch.manual_seed(cfg.seed)
    if kind == "vit":
        import copy

        enc = copy.deepcopy(encoder_state)
        model = ViTSegmenter(enc, data.classes, cfg.head, cfg.head_dim, cfg.freeze_encoder)
        return model, list(enc.parameters())
    return UNet(data.x_train.shape[1], data.classes, data.mean, data.std, tuple(cfg.unet_widths), data.channel_names), None

"""LLP models: `InstanceClassifier` (linear or MLP on embeddings) and `StridedConvLLP` (a strided
convolution + 1x1 softmax on pixels, ~5k parameters, which yields a coarse segmentation); `KDM`
is in kdm.py. `ProportionModel` wraps the chosen model for registration."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
    a chip's proportions are the mean over its patches, each weighted by its share of pixels with
    data. Inputs are normalised pixels with NaN where the store has no data: a NaN channel
    enters the convolution as 0 (the channel mean), and a pixel with no finite channel counts
    for nothing (a chip with none at all gets the plain mean)."""

    def __init__(self, in_chans: int, n_classes: int, stride: int = 8, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, hidden, kernel_size=stride, stride=stride)
        self.head = nn.Conv2d(hidden, n_classes, kernel_size=1)
        self.stride = stride

    def coarse_map(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return F.softmax(self.head(F.relu(self.conv(x))), dim=1)

    def patch_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, h, w) share of each patch's pixels that have data."""
        has = torch.isfinite(x).any(dim=1, keepdim=True).to(x.dtype if x.is_floating_point() else torch.float32)
        return F.avg_pool2d(has, kernel_size=self.stride, stride=self.stride)

    def instance(self, x: torch.Tensor) -> torch.Tensor:
        p = self.coarse_map(x)
        w = self.patch_weights(x)
        total = w.sum(dim=(2, 3))
        weighted = (p * w).sum(dim=(2, 3)) / total.clamp_min(1e-12)
        return torch.where(total > 0, weighted, p.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.instance(x)


class ProportionModel(nn.Module):
    """What is registered: raw inputs (embeddings, or pixels for conv) -> class proportions.
    Normalisation (and NaN handling: 0 for features, masked for pixels) is part of the model."""

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray, classes: list[int], kind: str):
        super().__init__()
        self.model = model
        shape = (1, -1, 1, 1) if kind == "conv" else (1, -1)
        self.register_buffer("mean", torch.tensor(np.asarray(mean, np.float32)).reshape(shape))
        self.register_buffer("std", torch.tensor(np.asarray(std, np.float32)).reshape(shape))
        self.classes = [int(c) for c in classes]
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if self.kind == "conv":  # the conv model masks missing pixels itself
            return self.model.instance(torch.where(torch.isfinite(x), x, torch.full_like(x, float("nan"))))
        return self.model.instance(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))

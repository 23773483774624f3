"""Baselines for the label-efficiency curves: hand-made raw-pixel statistics, and a small CNN
trained from scratch on the chips.

Both read the store's input sources (`chipstore.input_modalities`: every non-label source, or
the ones chosen) through the one reader (`chipstore.read_masked`: NaN at nodata).

- `pixel_statistics(store, modalities)`: per band mean, std and 10/50/90th percentiles of the
  valid pixels (NaN ignored), one row per chip in store order. A chip without any valid pixel
  of a band gets NaN there (the probes impute with the train mean and add a missing-indicator).
- `chip_tensor(store, modalities)`: the chips z-scored with the store's train statistics,
  nodata filled with the band's mean (0 after z-scoring): the input of the scratch CNN.
- `ScratchCNN`: two strided conv blocks + global pooling + a linear head, trained with Adam
  for a few epochs on CPU (classification, multi-label or regression).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from sarflow.errors import InputError

log = logging.getLogger(__name__)
PERCENTILES = (10, 50, 90)


def band_mean_std(arr) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of a store array from its train statistics (0 / 1 where unknown)."""
    st = arr.attrs["stats"]["bands"]
    bands = arr.attrs["bands"]
    return (np.array([st[b]["mean"] if st[b]["mean"] is not None else 0.0 for b in bands], np.float32),
            np.array([st[b]["std"] or 1.0 for b in bands], np.float32))


def pixel_statistics(store: str, modalities=None) -> tuple[np.ndarray, list[str]]:
    """(chips, features) float32 in store row order, and the feature names (`modality:band:stat`)."""
    from sarflow.data.chipstore import continuous_inputs, iter_masked, open_chip_group

    group = open_chip_group(store)
    n = int(group.attrs["chips"])
    feats, names = [], []
    for m in continuous_inputs(group, modalities, store, "the pixel baselines"):
        arr = group[m]
        bands = list(arr.attrs["bands"])
        labels = ["mean", "std"] + [f"p{p}" for p in PERCENTILES]
        out = np.full((len(labels), n, len(bands)), np.nan, np.float32)
        for start, x in iter_masked(arr, n):
            flat = x.reshape(x.shape[0], x.shape[1], -1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN chips give NaN, on purpose
                stats = [np.nanmean(flat, axis=2), np.nanstd(flat, axis=2)]
                stats += list(np.nanpercentile(flat, PERCENTILES, axis=2))
            out[:, start:start + len(x)] = np.stack(stats)
        for s, label in zip(out, labels):
            feats.append(s)
            names += [f"{m}:{b}:{label}" for b in bands]
    return np.concatenate(feats, axis=1).astype(np.float32), names


def chip_tensor(store: str, modalities=None) -> np.ndarray:
    """(chips, channels, H, W) float32, z-scored with the store's train statistics; nodata is
    filled with the band's mean (0 once z-scored)."""
    from sarflow.data.chipstore import continuous_inputs, iter_masked, open_chip_group

    group = open_chip_group(store)
    n = int(group.attrs["chips"])
    mods = continuous_inputs(group, modalities, store, "the pixel baselines")
    arrays = [group[m] for m in mods]
    shapes = {a.shape[2:] for a in arrays}
    if len(shapes) > 1:
        raise InputError(store, f"inputs {mods} have chips of different sizes {sorted(shapes)}")
    out = np.zeros((n, sum(a.shape[1] for a in arrays)) + arrays[0].shape[2:], np.float32)
    c = 0
    for arr in arrays:
        mean, std = band_mean_std(arr)
        k = arr.shape[1]
        for start, x in iter_masked(arr, n):
            x = np.where(np.isfinite(x), x, mean[None, :, None, None])  # nodata: the band mean
            out[start:start + len(x), c:c + k] = (x - mean[None, :, None, None]) / std[None, :, None, None]
        c += k
    return out


def _net(in_ch: int, out: int, width: int = 16):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, out))


class ScratchCNN:
    """A small CNN trained from scratch; `kind` is "multiclass", "multilabel" or "regression".
    sklearn-like: fit(x, y), predict(x), predict_proba(x) (classification)."""

    def __init__(self, kind: str, epochs: int = 10, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                 width: int = 16):
        self.kind, self.epochs, self.batch_size, self.lr, self.seed, self.width = kind, epochs, batch_size, lr, seed, width

    def fit(self, x: np.ndarray, y: np.ndarray) -> "ScratchCNN":
        import torch
        from torch import nn

        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        if self.kind == "multiclass":
            self.classes_, target = np.unique(y, return_inverse=True)
            out, loss_fn, t = len(self.classes_), nn.CrossEntropyLoss(), torch.from_numpy(target).long()
        elif self.kind == "multilabel":
            out, loss_fn, t = y.shape[1], nn.BCEWithLogitsLoss(), torch.from_numpy(np.asarray(y, np.float32))
        else:
            self.mu_, self.sd_ = float(np.mean(y)), float(np.std(y)) or 1.0
            out, loss_fn = 1, nn.MSELoss()
            t = torch.from_numpy(((np.asarray(y, np.float32) - self.mu_) / self.sd_)[:, None])
        self.net = _net(x.shape[1], out, self.width)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        n = len(xt)
        self.net.train()
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                opt.zero_grad()
                loss = loss_fn(self.net(xt[idx]), t[idx])
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        z = torch.from_numpy(self._forward(x))
        return (torch.softmax(z, 1) if self.kind == "multiclass" else torch.sigmoid(z)).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "multiclass":
            return self.classes_[self.predict_proba(x).argmax(1)]
        if self.kind == "multilabel":
            return (self.predict_proba(x) > 0.5).astype(np.int64)
        return self._forward(x)[:, 0] * self.sd_ + self.mu_

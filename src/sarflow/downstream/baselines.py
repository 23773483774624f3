"""Baselines for the label-efficiency curves: hand-made raw-pixel statistics, and a small CNN
trained from scratch on the chips.

- `pixel_statistics(store, modalities)`: per band NaN-aware mean, std and 10/50/90th
  percentiles of the continuous modalities (S1 backscatter, coherence, S2 RGB by default), one
  row per chip in store order. A chip without any valid pixel of a modality gets NaN there
  (the probes impute with the train mean and add a missing-indicator).
- `chip_tensor(store, modalities)`: the chips z-scored with the store's train statistics,
  NaN at 0: the input of the scratch CNN.
- `ScratchCNN`: two strided conv blocks + global pooling + a linear head, trained with Adam
  for a few epochs on CPU (classification, multi-label or regression).
"""

from __future__ import annotations

import warnings

import numpy as np

from sarflow.errors import InputError

DEFAULT_MODALITIES = ("s1grd", "s1coh", "s2rgb")
PERCENTILES = (10, 50, 90)


def _continuous(group, store: str, modalities) -> list[str]:
    mods = list(group.attrs.get("modalities", []))
    out = []
    for m in modalities:
        if m not in mods:
            continue
        if group[m].attrs.get("kind") != "continuous":
            raise InputError(store, f"modality {m!r} is categorical: pixel statistics need continuous data")
        out.append(m)
    if not out:
        raise InputError(store, f"none of the modalities {list(modalities)} is in the store (it has {mods})")
    return out


def read_float(arr, n: int | None = None) -> np.ndarray:
    """The first `n` chips (default all) of a store array as float32, NaN at its nodata;
    the array is read once."""
    raw = arr[:n]
    x = raw.astype(np.float32)
    nd = arr.attrs.get("nodata_in_store")
    if nd not in (None, "NaN"):
        x[raw == nd] = np.nan
    return x


def band_mean_std(arr) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of a store array from its train statistics (0 / 1 where unknown)."""
    st = arr.attrs["stats"]["bands"]
    bands = arr.attrs["bands"]
    return (np.array([st[b]["mean"] if st[b]["mean"] is not None else 0.0 for b in bands], np.float32),
            np.array([st[b]["std"] or 1.0 for b in bands], np.float32))


def pixel_statistics(store: str, modalities=DEFAULT_MODALITIES) -> tuple[np.ndarray, list[str]]:
    """(chips, features) float32 in store row order, and the feature names."""
    from sarflow.data.chipstore import open_chip_group

    group = open_chip_group(store)
    feats, names = [], []
    for m in _continuous(group, store, modalities):
        arr = group[m]
        x = read_float(arr)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN chips give NaN, on purpose
            stats = [np.nanmean(flat, axis=2), np.nanstd(flat, axis=2)]
            stats += list(np.nanpercentile(flat, PERCENTILES, axis=2))
        for s, label in zip(stats, ["mean", "std"] + [f"p{p}" for p in PERCENTILES]):
            feats.append(s)
            names += [f"{m}:{b}:{label}" for b in arr.attrs["bands"]]
    return np.concatenate(feats, axis=1).astype(np.float32), names


def chip_tensor(store: str, modalities=DEFAULT_MODALITIES) -> np.ndarray:
    """(chips, channels, H, W) float32, z-scored with the store's train statistics, NaN -> 0."""
    from sarflow.data.chipstore import open_chip_group

    group = open_chip_group(store)
    parts = []
    for m in _continuous(group, store, modalities):
        arr = group[m]
        x = read_float(arr)
        mean, std = band_mean_std(arr)
        parts.append((x - mean[None, :, None, None]) / std[None, :, None, None])
    return np.nan_to_num(np.concatenate(parts, axis=1), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


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

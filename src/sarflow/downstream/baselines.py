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
  for a fixed budget of optimiser steps at every label count, the best state on validation
  kept (early stopping) (classification, multi-label or regression).
- `random_encoder_features(...)`: embeddings of the store's chips by a randomly initialised
  encoder of the same architecture as the probed one (`training.export.build_plain_encoder`
  from its plain config, a fixed seed): what the architecture gives without pretraining.
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
    from sarflow.data.chipstore import chip_shape, continuous_inputs, iter_masked, open_chip_group

    group = open_chip_group(store)
    n = int(group.attrs["chips"])
    mods = continuous_inputs(group, modalities, store, "the pixel baselines")
    arrays = [group[m] for m in mods]
    shapes = {chip_shape(a)[2:] for a in arrays}
    if len(shapes) > 1:
        raise InputError(store, f"inputs {mods} have chips of different sizes {sorted(shapes)}")
    out = np.zeros((n, sum(a.shape[1] for a in arrays)) + chip_shape(arrays[0])[2:], np.float32)
    c = 0
    for arr in arrays:
        mean, std = band_mean_std(arr)
        k = arr.shape[1]
        for start, x in iter_masked(arr, n):
            x = np.where(np.isfinite(x), x, mean[None, :, None, None])  # nodata: the band mean
            out[start:start + len(x), c:c + k] = (x - mean[None, :, None, None]) / std[None, :, None, None]
        c += k
    return out


RANDOM_SEED = 1234  # the random encoder's initialisation, the same on every run


def plain_encoder_uri(model: str, version: str) -> str:
    """Where the plain encoder (config.json + weights) of registered embeddings model `model`
    v`version` is: its model version's `sarflow.plain_encoder` tag (what pretrain logs), or the
    run's folder for embeddings made from a run URI (`run-<id>`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from sarflow.training.export import PLAIN_ENCODER

    if model.startswith("run-"):
        return f"runs:/{model[len('run-'):]}/{PLAIN_ENCODER}"
    try:
        mv = mlflow.MlflowClient().get_model_version(model, version)
    except MlflowException as e:
        raise InputError(f"{model} v{version}", f"not in the MLflow registry at {mlflow.get_tracking_uri()} "
                                                f"({e.error_code}): its architecture is unknown") from None
    uri = mv.tags.get("sarflow.plain_encoder")
    if not uri:
        raise InputError(f"{model} v{version}", "the model version has no sarflow.plain_encoder tag "
                                                "(registered before pretrain exported plain encoders)")
    return uri


def random_encoder_features(store: str, model: str, version: str, seed: int = RANDOM_SEED,
                            batch_size: int = 256) -> np.ndarray:
    """(chips, dim) float32 in store row order: the store's chips embedded by an encoder of the
    same architecture (and input normalisation) as `model` v`version`, its weights randomly
    initialised with `seed`. Chips are read as `embed` reads them (`encoder_arrays`/`encoder_chips`)."""
    import json
    import tempfile
    from pathlib import Path

    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from sarflow.data.chipstore import open_chip_group
    from sarflow.features.embed import encoder_arrays, encoder_chips
    from sarflow.training.export import CONFIG, build_plain_encoder

    uri = plain_encoder_uri(model, version)
    with tempfile.TemporaryDirectory(prefix="sarflow-random-encoder-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{CONFIG}", dst_path=tmp)
        except (MlflowException, OSError) as e:
            raise InputError(uri, f"cannot read the plain encoder's {CONFIG} ({type(e).__name__}: {e})") from None
        config = json.loads(Path(path).read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_plain_encoder(config).eval()
    group = open_chip_group(store)
    arrays = encoder_arrays(group, encoder, store)
    n = int(group.attrs["chips"])
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(encoder_chips(arrays, slice(start, min(n, start + batch_size)))))
            out.append(encoder(x).float().numpy())
    return np.concatenate(out).astype(np.float32)


def _net(in_ch: int, out: int, width: int = 16):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, out))


class ScratchCNN:
    """A small CNN trained from scratch; `kind` is "multiclass", "multilabel" or "regression".
    sklearn-like: fit(x, y[, x_val, y_val]), predict(x), predict_proba(x) (classification).

    A fair budget at every label count: Adam for `steps` optimiser steps whatever the number of
    training chips (epochs = steps / batches per epoch, at least `min_epochs`), so n = 25 gets as
    many updates as n = 1000. Given a validation set, the net is scored on it every `eval_every`
    steps (the task's primary metric, `metric`; ties broken by the lower validation loss), the
    best state is kept and training stops after `patience` evaluations without improvement:
    the model returned is the one at its own validation optimum (`best_step_`, `best_val_`, and
    every evaluation in `history_`)."""

    def __init__(self, kind: str, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                 width: int = 16, min_epochs: int = 1, eval_every: int = 10, patience: int = 10,
                 metric: str | None = None, higher_is_better: bool = True):
        self.kind, self.steps, self.batch_size, self.lr, self.seed, self.width = kind, steps, batch_size, lr, seed, width
        self.min_epochs, self.eval_every, self.patience = min_epochs, eval_every, patience
        self.metric = metric or {"multiclass": "macro_f1", "multilabel": "map", "regression": "rmse"}[kind]
        self.higher_is_better = higher_is_better if metric else kind != "regression"

    def epochs_for(self, n: int) -> int:
        """Passes over n training chips that make the step budget."""
        per_epoch = max(1, sum(1 for s in range(0, n, self.batch_size) if min(self.batch_size, n - s) >= 2))
        return max(self.min_epochs, -(-self.steps // per_epoch))

    def _targets(self, y: np.ndarray):
        import torch

        if self.kind == "multiclass":
            lookup = {c: i for i, c in enumerate(self.classes_.tolist())}
            return torch.tensor([lookup.get(v, -100) for v in np.asarray(y).tolist()], dtype=torch.long)
        if self.kind == "multilabel":
            return torch.from_numpy(np.asarray(y, np.float32))
        return torch.from_numpy(((np.asarray(y, np.float32) - self.mu_) / self.sd_)[:, None])

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> "ScratchCNN":
        import copy

        import torch
        from torch import nn

        from sarflow.downstream.estimators import output_metrics

        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        if self.kind == "multiclass":
            self.classes_ = np.unique(y)
            out, loss_fn = len(self.classes_), nn.CrossEntropyLoss(ignore_index=-100)
        elif self.kind == "multilabel":
            out, loss_fn = y.shape[1], nn.BCEWithLogitsLoss()
        else:
            self.mu_, self.sd_ = float(np.mean(y)), float(np.std(y)) or 1.0
            out, loss_fn = 1, nn.MSELoss()
        t = self._targets(y)
        self.net = _net(x.shape[1], out, self.width)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        validate = x_val is not None and y_val is not None and len(y_val) > 0
        if validate:
            xv, tv = torch.from_numpy(np.ascontiguousarray(x_val, np.float32)), self._targets(y_val)
        n = len(xt)
        self.history_, self.best_step_, self.best_val_, best, best_key, waited = [], None, None, None, None, 0
        step, self.epochs_ = 0, self.epochs_for(n)
        stop = False
        for _ in range(self.epochs_):
            self.net.train()
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                opt.zero_grad()
                loss = loss_fn(self.net(xt[idx]), t[idx])
                loss.backward()
                opt.step()
                step += 1
                if validate and step % self.eval_every == 0:
                    self.net.eval()
                    with torch.no_grad():
                        z = self.net(xv)
                        vloss = float(loss_fn(z, tv))
                    vloss = vloss if np.isfinite(vloss) else float("inf")
                    value = output_metrics(self.kind, y_val, self._output(z.numpy()))[self.metric]
                    self.history_.append({"step": step, "val": value, "val_loss": vloss})
                    key = (value if self.higher_is_better else -value, -vloss) if np.isfinite(value) else (-np.inf, -vloss)
                    if best_key is None or key > best_key:
                        best_key, best, waited = key, copy.deepcopy(self.net.state_dict()), 0
                        self.best_step_, self.best_val_ = step, value
                    else:
                        waited += 1
                    self.net.train()
                    if waited >= self.patience:
                        stop = True
                        break
            if stop:
                break
        self.steps_ = step
        if best is not None:
            self.net.load_state_dict(best)
        self.net.eval()
        return self

    def _output(self, z: np.ndarray) -> np.ndarray:
        """model_output from the net's raw outputs."""
        import torch

        if self.kind == "multiclass":
            return self.classes_[z.argmax(1)]
        if self.kind == "multilabel":
            return torch.sigmoid(torch.from_numpy(z)).numpy()
        return z[:, 0] * self.sd_ + self.mu_

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

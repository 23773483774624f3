"""Semantic segmentation downstream of the pretrained encoders: a light head on the patch tokens
of a registered `ChipEncoder` (frozen or fine-tuned) against a small U-Net trained from
scratch on the same input channels, scored by mIoU on the test split.

- Labels: a categorical modality of the store (WorldCover codes 10..100 by default). The
  classes are the codes present in the train chips, mapped to contiguous indices; nodata (0)
  and codes the train split never shows are ignored (`IGNORE`), never a class.
- `ViTSegmenter`: the encoder's backbone(s) give one token per patch; the tokens of the
  groups are concatenated, reshaped to the patch grid and decoded to per-pixel logits by a
  1x1 convolution + bilinear upsampling (`head="linear"`) or a small progressive upsampler.
- `UNet`: 2-3 levels (16-32-64 channels by default), GroupNorm, from scratch.
- Both modules take what the ChipEncoder takes (chips in physical units, channels of the
  groups concatenated, NaN = missing), normalise internally and return per-pixel class
  probabilities (batch, classes, H, W); `class_codes` maps index -> code and `predict_codes`
  gives code maps. So a registered segmentation model runs on chips read from the store.
- Metrics (`confusion_matrix`, `segmentation_scores`): IoU per class = TP / (TP + FP + FN)
  over non-ignored pixels; mIoU is the mean over classes present in truth or prediction (a
  class absent from both is not counted); pixel accuracy over non-ignored pixels.
- `run_segmentation`: trains both, one MLflow run each (lineage tags, params, metrics
  `test_miou`, `test_pixel_accuracy`, `test_iou_<code>`, confusion matrix, prediction figure),
  and registers the better one as ``sarflow-segmentation`` with `log_downstream_model`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sarflow.errors import InputError
from sarflow.data.quicklook import WORLDCOVER_COLORS

log = logging.getLogger(__name__)

IGNORE = -100  # torch's cross-entropy default ignore_index
TASK = "segmentation"
DEFAULT_GROUPS = [("s1", "s1grd", None)]


@dataclass
class SegmentConfig:
    store: str
    tracking_uri: str = "sqlite:///mlflow.db"
    encoder_uri: str | None = None  # e.g. models:/sarflow-encoder-mae/1; None trains only the U-Net
    label_modality: str = "worldcover"
    groups: list[tuple[str, str, list[str] | None]] | None = None  # (group, modality, bands); default: the encoder's
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    encoder_lr_scale: float = 0.1  # fine-tuning: the encoder learns at lr * this
    freeze_encoder: bool = False  # True: head on frozen tokens (linear-probe-like); False: full fine-tune
    head: str = "progressive"  # "linear" (1x1 conv + bilinear) or "progressive" (x2 upsampling stages)
    head_dim: int = 64
    unet_widths: tuple[int, ...] = (16, 32, 64)
    train_unet: bool = True
    label_fractions: tuple[float, ...] = ()  # extra label-efficiency points, e.g. (0.1,): fraction of train chips
    augment: bool = True  # random flips / 90-degree rotations of each batch
    test_split: str = "test"
    plot_chips: int = 4
    experiment: str = "sarflow-segmentation"
    register: bool = True  # registers the better of the two (by test mIoU) as sarflow-segmentation
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (None: leave torch's setting)


# ------------------------------------------------------------------------------------ metrics

def confusion_matrix(truth, pred, n_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = truth, columns = prediction; pixels whose truth is
    `ignore_index` (or outside 0..n_classes-1) are left out."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction differ in size: {t.shape} vs {p.shape}")
    keep = (t != ignore_index) & (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(cm: np.ndarray) -> dict:
    """mIoU (over classes present in truth or prediction), per-class IoU (NaN where absent from
    both) and pixel accuracy from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = cm.sum()
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "pixels": int(total)}


def miou(truth, pred, n_classes: int, ignore_index: int = IGNORE) -> float:
    return segmentation_scores(confusion_matrix(truth, pred, n_classes, ignore_index))["miou"]


# ------------------------------------------------------------------------------------ models

class _Segmenter(nn.Module):
    """Shared: class codes, probabilities out, code maps."""

    class_codes: list[int]

    def _set_classes(self, codes: list[int]) -> None:
        self.class_codes = [int(c) for c in codes]
        self.register_buffer("codes", torch.tensor(self.class_codes, dtype=torch.int64))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Chips in physical units (NaN = missing) -> per-pixel class probabilities (B, C, H, W)."""
        return self.logits(x).softmax(dim=1)

    @torch.no_grad()
    def predict_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) class codes (e.g. WorldCover codes)."""
        return self.codes[self.logits(x).argmax(dim=1)]


class ViTSegmenter(_Segmenter):
    """A registered ChipEncoder's patch tokens -> light decoder -> per-pixel logits."""

    def __init__(self, encoder: nn.Module, class_codes: list[int], head: str = "progressive", head_dim: int = 64,
                 freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self._set_classes(class_codes)
        self.freeze_encoder = freeze_encoder
        self.head_kind = head
        self.patch = _encoder_patch(encoder)
        dim = sum(encoder.backbones[name].dim for name, _ in encoder.groups)
        n = len(class_codes)
        if head == "linear":
            self.decoder = nn.Conv2d(dim, n, kernel_size=1)
        elif head == "progressive":
            stages, width = [], head_dim
            layers: list[nn.Module] = [nn.Conv2d(dim, width, kernel_size=1), nn.GELU()]
            for _ in range(max(0, int(math.floor(math.log2(self.patch))))):
                out = max(16, width // 2)
                stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                           nn.Conv2d(width, out, kernel_size=3, padding=1), nn.GELU()]
                width = out
            self.decoder = nn.Sequential(*layers, *stages, nn.Conv2d(width, n, kernel_size=1))
        else:
            raise ValueError(f"unknown head {head!r}: linear or progressive")
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum of dims, H/patch, W/patch): the patch tokens of every group, concatenated."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the encoder's patch size {self.patch}")
        parts, _ = self.encoder.split(x)
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        maps = []
        for name, _ in self.encoder.groups:
            t = self.encoder.backbones[name](parts[name])[:, 1:]
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw))
        return torch.cat(maps, dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                t = self.tokens(x)
        else:
            t = self.tokens(x)
        out = self.decoder(t)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class UNet(_Segmenter):
    """A small U-Net from scratch; normalises physical inputs with the store's train stats."""

    def __init__(self, in_chans: int, class_codes: list[int], mean, std, widths: tuple[int, ...] = (16, 32, 64),
                 channel_names: list[str] | None = None):
        super().__init__()
        if len(widths) < 2:
            raise ValueError("the U-Net needs at least 2 levels")
        self._set_classes(class_codes)
        self.channel_names = list(channel_names or [])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.in_chans = in_chans
        self.down = nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.out = nn.Conv2d(widths[0], len(class_codes), kernel_size=1)
        self.levels = len(widths)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (batch, {self.in_chans}, H, W) for channels {self.channel_names}, got {tuple(x.shape)}")
        z = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return torch.where(torch.isfinite(z), z, torch.zeros_like(z))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        z = self.normalise(x)
        z = F.pad(z, (0, (-w) % m, 0, (-h) % m))
        skips = []
        for i, blk in enumerate(self.down):
            z = blk(z if i == 0 else F.max_pool2d(z, 2))
            skips.append(z)
        for blk, skip in zip(self.up, reversed(skips[:-1])):
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            z = blk(torch.cat([z, skip], dim=1))
        return self.out(z)[..., :h, :w]


def _encoder_patch(encoder) -> int:
    patches = {int(encoder.backbones[name].patch) for name, _ in encoder.groups}
    if len(patches) != 1:
        raise ValueError(f"the encoder's groups use different patch sizes {sorted(patches)}")
    return patches.pop()


# ------------------------------------------------------------------------------------ data

@dataclass
class SegData:
    x_train: torch.Tensor  # (n, C, H, W) physical units, NaN = missing
    y_train: torch.Tensor  # (n, H, W) contiguous class indices, IGNORE for nodata / unknown codes
    x_test: torch.Tensor
    y_test: torch.Tensor
    codes_test: np.ndarray  # (n, H, W) raw label codes of the test chips
    classes: list[int]
    channel_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    test_chip_ids: list[str]
    unknown_test_fraction: float  # labelled test pixels whose code the train split never shows


def load_encoder(uri: str):
    """The registered ChipEncoder at `uri` (models:/name/version, runs:/..., a path)."""
    import mlflow

    from sarflow.training.encoder import ChipEncoder

    try:
        model = mlflow.pytorch.load_model(uri)
    except Exception as e:  # MlflowException, OSError...: the URI does not resolve to a model
        raise InputError(uri, f"cannot load the encoder: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(model, ChipEncoder):
        raise InputError(uri, f"not a sarflow ChipEncoder (got {type(model).__name__}): register one with `sarflow pretrain`")
    return model.cpu().float()


def resolve_inputs(cfg: SegmentConfig, encoder=None) -> tuple[list[tuple[str, str, list[str]]], np.ndarray, np.ndarray]:
    """(group, modality, bands) of the input channels, with the store's train mean/std per channel."""
    from sarflow.data.chipstore import open_chip_group
    from sarflow.training.pretrain import store_group

    group = open_chip_group(cfg.store)
    if not group.attrs.get("modalities"):
        raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
    if encoder is not None:
        enc_groups = [(name, mod, list(bands)) for (name, bands), mod in zip(encoder.groups, encoder.modalities)]
        if cfg.groups is not None:
            asked = [(n, m, list(b) if b else None) for n, m, b in cfg.groups]
            if [(m, b or bb) for (n, m, b), (_, _, bb) in zip(asked, enc_groups)] != [(m, b) for _, m, b in enc_groups] \
                    or len(asked) != len(enc_groups):
                raise InputError(cfg.encoder_uri or "encoder", f"the encoder takes {enc_groups}, not the groups {cfg.groups}")
        groups = enc_groups
    else:
        groups = [(n, m, list(b) if b else None) for n, m, b in (cfg.groups or DEFAULT_GROUPS)]
    resolved = [store_group(group, cfg.store, name, modality, bands) for name, modality, bands in groups]
    out = [(g.name, g.modality, g.bands) for g in resolved]
    mean = [m for g in resolved for m in g.mean]
    std = [v for g in resolved for v in g.std]
    return out, np.array(mean, np.float32), np.array(std, np.float32)


def _read_inputs(group, groups, rows: np.ndarray) -> np.ndarray:
    parts = []
    for _, modality, bands in groups:
        arr = group[modality]
        idx = [list(arr.attrs["bands"]).index(b) for b in bands]
        raw = arr.oindex[rows.tolist()] if len(rows) else np.zeros((0,) + arr.shape[1:], arr.dtype)
        x = raw[:, idx].astype(np.float32)
        nodata = arr.attrs.get("nodata_in_store")
        if nodata not in (None, "NaN"):
            x[raw[:, idx] == nodata] = np.nan
        parts.append(x)
    return np.concatenate(parts, axis=1)


def load_data(cfg: SegmentConfig, groups, mean, std) -> SegData:
    """Train and test chips in memory (inputs in physical units), labels mapped to indices."""
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    group = open_chip_group(cfg.store)
    mods = list(group.attrs.get("modalities", []))
    if cfg.label_modality not in mods:
        raise InputError(cfg.store, f"the store has no label modality {cfg.label_modality!r} (it has {mods})")
    lab = group[cfg.label_modality]
    if lab.attrs["kind"] != "categorical":
        raise InputError(cfg.store, f"label modality {cfg.label_modality!r} is not categorical (it is {lab.attrs['kind']})")
    nodata = lab.attrs.get("nodata_in_store")
    nodata = 0 if nodata in (None, "NaN") else int(nodata)
    table = read_chip_table(cfg.store)
    col = f"valid_{cfg.label_modality}"
    labelled = table[table[col] > 0] if col in table.columns else table

    def rows(split):
        return np.sort(labelled.loc[labelled["split"] == split, "index"].to_numpy())

    train_rows, test_rows = rows("train"), rows(cfg.test_split)
    if not len(train_rows):
        raise InputError(cfg.store, f"no train chips with {cfg.label_modality!r} labels")
    if not len(test_rows):
        raise InputError(cfg.store, f"no {cfg.test_split!r} chips with {cfg.label_modality!r} labels to evaluate on")
    y_train_codes = lab.oindex[train_rows.tolist()][:, 0].astype(np.int64)
    y_test_codes = lab.oindex[test_rows.tolist()][:, 0].astype(np.int64)
    classes = sorted(int(c) for c in np.unique(y_train_codes) if c != nodata)
    if len(classes) < 2:
        raise InputError(cfg.store, f"the train chips show {len(classes)} label class(es) {classes}: need at least 2")
    lut = np.full(max(int(y_train_codes.max()), int(y_test_codes.max()), max(classes)) + 1, IGNORE, np.int64)
    lut[classes] = np.arange(len(classes))
    if 0 <= nodata < len(lut):
        lut[nodata] = IGNORE
    labelled_test = y_test_codes != nodata
    unknown = labelled_test & (lut[y_test_codes] == IGNORE)
    x_train = _read_inputs(group, groups, train_rows)
    x_test = _read_inputs(group, groups, test_rows)
    ids = dict(zip(table["index"].tolist(), table["chip_id"].tolist()))
    return SegData(torch.from_numpy(x_train), torch.from_numpy(lut[y_train_codes]), torch.from_numpy(x_test),
                   torch.from_numpy(lut[y_test_codes]), y_test_codes, classes,
                   [f"{g}:{b}" for g, _, bands in groups for b in bands], mean, std,
                   [ids[int(r)] for r in test_rows], float(unknown.sum() / max(labelled_test.sum(), 1)))


# ------------------------------------------------------------------------------------ training

def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip and 90-degree rotation for the whole batch's inputs and labels."""
    k = int(torch.randint(4, (1,), generator=gen))
    if torch.rand(1, generator=gen) < 0.5:
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    if k:
        x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    return x, y


def train_model(model: _Segmenter, x: torch.Tensor, y: torch.Tensor, cfg: SegmentConfig,
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
def predict_indices(model: _Segmenter, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model.logits(x[i:i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


def evaluate(model: _Segmenter, data: SegData) -> dict:
    pred = predict_indices(model, data.x_test)
    cm = confusion_matrix(data.y_test.numpy(), pred.numpy(), len(data.classes))
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


def _subset(data: SegData, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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


# ------------------------------------------------------------------------------------ figures

def _code_cmap(classes: list[int]):
    from matplotlib.colors import ListedColormap

    import matplotlib.pyplot as plt

    tab = plt.get_cmap("tab20")
    colors = ["#000000"] + [WORLDCOVER_COLORS.get(c, tab(i % 20)) for i, c in enumerate(classes)]
    return ListedColormap(colors)


def prediction_figure(data: SegData, preds: dict[str, torch.Tensor], path: Path, n: int = 4) -> Path:
    """Input (first channel), truth and each model's prediction for the first `n` test chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(data.x_test))
    cmap = _code_cmap(data.classes)
    codes = np.array([0] + data.classes)

    def to_slot(idx: np.ndarray) -> np.ndarray:  # class index -> colour slot (0 = ignored/nodata)
        return np.where(idx == IGNORE, 0, idx + 1)

    cols = 2 + len(preds)
    fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols, 2.1 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(data.x_test[i, 0].numpy(), cmap="gray")
        panels = [("truth", data.y_test[i].numpy())] + [(k, p[i].numpy()) for k, p in preds.items()]
        for j, (_, idx) in enumerate(panels, start=1):
            axes[i, j].imshow(to_slot(idx), cmap=cmap, vmin=0, vmax=len(codes) - 1, interpolation="nearest")
        for j, title in enumerate([data.channel_names[0]] + [name for name, _ in panels]):
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
        axes[i, 0].set_ylabel(data.test_chip_ids[i], fontsize=6)
    handles = [matplotlib.patches.Patch(color=cmap(k + 1), label=str(c)) for k, c in enumerate(data.classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def loss_figure(curves: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for k, v in curves.items():
        ax.plot(v, label=k)
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy"), ax.legend(), ax.set_title("segmentation training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ pipeline

def check_config(cfg: SegmentConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise InputError("segment config", f"steps ({cfg.steps}), batch_size ({cfg.batch_size}) and lr ({cfg.lr}) must be positive")
    if cfg.head not in ("linear", "progressive"):
        raise InputError("segment config", f"head must be linear or progressive, not {cfg.head!r}")
    bad = [f for f in cfg.label_fractions if not 0 < f <= 1]
    if bad:
        raise InputError("segment config", f"label fractions must be in (0, 1], got {bad}")
    if cfg.encoder_uri is None and not cfg.train_unet:
        raise InputError("segment config", "nothing to train: give an encoder URI or keep the U-Net")


def run_segmentation(cfg: SegmentConfig) -> dict:
    """Trains the ViT head (when `encoder_uri` is given) and the U-Net, evaluates both on the
    test split, tracks one MLflow run per model and registers the better one."""
    check_config(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: SegmentConfig) -> dict:
    import mlflow

    from sarflow.downstream.models import log_downstream_model
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow
    from sarflow.data.chipstore import open_chip_group

    t0 = time.perf_counter()
    try:  # a missing store fails here, before the encoder is loaded
        size = int(open_chip_group(cfg.store).attrs.get("chip_size", 0))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise InputError(cfg.store, f"cannot open the chip store: {e}") from None
    encoder = None
    if cfg.encoder_uri:
        setup_mlflow(cfg.tracking_uri, cfg.experiment)
        encoder = load_encoder(cfg.encoder_uri)
        patch = _encoder_patch(encoder)
        if size < patch or size % patch:
            raise InputError(cfg.store, f"chips of {size} px cannot be cut into the {patch} px patches of the encoder "
                                        f"{cfg.encoder_uri} (the chip side must be a multiple of the patch size)")
    groups, mean, std = resolve_inputs(cfg, encoder)
    data = load_data(cfg, groups, mean, std)
    kinds = (["vit"] if encoder is not None else []) + (["unet"] if cfg.train_unet else [])
    baseline = majority_baseline(data)
    results, models, curves = {}, {}, {}
    for kind in kinds:
        t = time.perf_counter()
        model, enc_params = _build(kind, cfg, data, encoder)
        losses = train_model(model, data.x_train, data.y_train, cfg, enc_params)
        ev = evaluate(model, data)
        label_eff = {}
        for frac in cfg.label_fractions:
            if frac >= 1:
                continue
            sub, enc_sub = _build(kind, cfg, data, encoder)
            xs, ys = _subset(data, frac, cfg.seed)
            train_model(sub, xs, ys, cfg, enc_sub)
            label_eff[frac] = evaluate(sub, data)["miou"]
        models[kind], curves[kind] = model, losses
        results[kind] = {"test_miou": ev["miou"], "test_pixel_accuracy": ev["pixel_accuracy"], "iou": ev["iou"],
                         "confusion": ev["confusion"], "pred": ev["pred"], "losses": losses,
                         "label_efficiency": {**label_eff, 1.0: ev["miou"]},
                         "params": sum(p.numel() for p in model.parameters()),
                         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "train_seconds": time.perf_counter() - t}
        log.info("%s: test mIoU %.3f in %.1fs", kind, ev["miou"], results[kind]["train_seconds"])

    lineage = dataset_lineage(cfg.store)
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment)
    eval_set = f"{lineage.get('sarflow.dataset_dvc_md5', 'untracked')}:{cfg.test_split}"
    best = max(kinds, key=lambda k: (np.nan_to_num(results[k]["test_miou"], nan=-1.0), k == "vit"))
    example = data.x_test[:2].numpy()
    common = {"store": cfg.store, "label_modality": cfg.label_modality, "classes": data.classes,
              "channels": data.channel_names, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
              "augment": cfg.augment, "seed": cfg.seed, "train_chips": len(data.x_train),
              "test_chips": len(data.x_test), "test_split": cfg.test_split, "chip_size": size}
    out = {"classes": data.classes, "plots": [], "registered": None, "best": best,
           "majority_baseline": baseline, "unknown_test_fraction": data.unknown_test_fraction}
    with tempfile.TemporaryDirectory() as tmp:
        fig = prediction_figure(data, {k: results[k]["pred"] for k in kinds}, Path(tmp) / "predictions.png",
                                cfg.plot_chips)
        lfig = loss_figure(curves, Path(tmp) / "loss_curves.png")
        for kind in kinds:
            r, model = results[kind], models[kind]
            params = dict(common, model=kind)
            if kind == "vit":
                params.update(encoder_uri=cfg.encoder_uri, freeze_encoder=cfg.freeze_encoder, head=cfg.head,
                              head_dim=cfg.head_dim, encoder_lr_scale=cfg.encoder_lr_scale, patch=model.patch)
            else:
                params.update(unet_widths=list(cfg.unet_widths))
            params.update(trainable_params=r["trainable_params"], params=r["params"])
            metrics = {"test_miou": r["test_miou"], "test_pixel_accuracy": r["test_pixel_accuracy"],
                       **{f"test_iou_{c}": v for c, v in r["iou"].items() if np.isfinite(v)}}
            tags = {**lineage, "sarflow.task": TASK, "sarflow.segmentation.model": kind,
                    "sarflow.classes": ",".join(map(str, data.classes))}
            if kind == "vit":
                tags["sarflow.encoder_uri"] = cfg.encoder_uri
            with mlflow.start_run(experiment_id=exp_id, run_name=f"segmentation-{kind}", tags=tags) as run:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
                client = mlflow.MlflowClient()
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                extra = [Metric("train_loss", v, now, i) for i, v in enumerate(r["losses"])]
                extra += [Metric(f"test_miou_labels_{int(round(f * 100))}pct", v, now, 0)
                          for f, v in r["label_efficiency"].items()]
                extra += [Metric("baseline_majority_miou", baseline["miou"], now, 0),
                          Metric("train_seconds", r["train_seconds"], now, 0)]
                for i in range(0, len(extra), 900):
                    client.log_batch(run.info.run_id, metrics=extra[i:i + 900])
                mlflow.log_dict({"classes": data.classes, "rows_truth_cols_pred": r["confusion"]},
                                "confusion_matrix.json")
                mlflow.log_artifact(str(fig), artifact_path="figures")
                mlflow.log_artifact(str(lfig), artifact_path="figures")
                register = cfg.register and kind == best
                info = log_downstream_model(model, TASK, example, lineage=lineage, eval_set=eval_set, metrics=metrics,
                                            register=register)
                if register:
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.classes",
                                                 ",".join(map(str, data.classes)))
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.segmentation.model", kind)
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.channels",
                                                 ",".join(data.channel_names))
                    out["registered"] = dict(info, model=kind)
            out[kind] = {"run_id": run.info.run_id, "model_uri": info["model_uri"],
                         **{k: r[k] for k in ("test_miou", "test_pixel_accuracy", "iou", "confusion", "losses",
                                              "label_efficiency", "params", "trainable_params", "train_seconds")}}
        out["plots"] = [f"figures/{fig.name}", f"figures/{lfig.name}"]
    out["seconds"] = time.perf_counter() - t0
    return out

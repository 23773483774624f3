"""Segmentation inputs: the registered encoder, the input channels with the store's train statistics,
and the train, val and test chips in memory (read through `chipstore.read_masked`: NaN at nodata)
with labels mapped to the positions of the label's declared classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from sarflow.downstream.segmentation.config import SegmentConfig
from sarflow.downstream.segmentation.metrics import IGNORE
from sarflow.downstream.tasks import MIN_CLASS_CHIPS, MIN_EVAL_CHIPS
from sarflow.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class SegData:
    x_train: torch.Tensor  # (n, C, H, W) physical units, NaN = missing
    y_train: torch.Tensor  # (n, H, W) class positions, IGNORE for nodata / undeclared codes
    x_test: torch.Tensor
    y_test: torch.Tensor
    codes_test: np.ndarray  # (n, H, W) raw label codes of the test chips (NaN at nodata)
    classes: list[int]  # the label's declared class codes
    channel_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    test_chip_ids: list[str]
    unknown_test_fraction: float  # test pixels with a code the label does not declare (not a class: ignored)
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    label: str = "label"
    class_names: list[str] = field(default_factory=list)
    class_colors: dict[int, str] = field(default_factory=dict)
    channel_units: list[str] = field(default_factory=list)  # the store's `units` of each channel


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


def segmentation_label(group, store: str, name: str | None):
    """The categorical label to segment: `name`, or the store's only categorical label."""
    from sarflow.downstream.llp.data import categorical_label

    return categorical_label(group, store, name, "the one to segment with --label (segment.label_modality)",
                             "segmentation predicts one")


def resolve_inputs(cfg: SegmentConfig, encoder=None) -> tuple[list[tuple[str, str, list[str]]], np.ndarray, np.ndarray]:
    """(group, modality, bands) of the input channels, with the store's train mean/std per channel."""
    from sarflow.data.chipstore import continuous_inputs, open_chip_group
    from sarflow.features.embed import encoder_sources
    from sarflow.training.pretrain import store_group

    group = open_chip_group(cfg.store)
    if not group.attrs.get("modalities"):
        raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
    if encoder is not None:
        enc_groups = encoder_sources(encoder)
        if cfg.groups is not None:
            asked = [(n, m, list(b) if b else None) for n, m, b in cfg.groups]
            if [(m, b or bb) for (n, m, b), (_, _, bb) in zip(asked, enc_groups)] != [(m, b) for _, m, b in enc_groups] \
                    or len(asked) != len(enc_groups):
                raise InputError(cfg.encoder_uri or "encoder", f"the encoder takes {enc_groups}, not the groups {cfg.groups}")
        groups = enc_groups
    elif cfg.groups:
        groups = [(n, m, list(b) if b else None) for n, m, b in cfg.groups]
    else:
        groups = [(m, m, None) for m in continuous_inputs(group, list(cfg.modalities) or None, cfg.store, "the U-Net")]
    resolved = [store_group(group, cfg.store, name, modality, bands) for name, modality, bands in groups]
    out = [(g.name, g.modality, g.bands) for g in resolved]
    mean = [m for g in resolved for m in g.mean]
    std = [v for g in resolved for v in g.std]
    return out, np.array(mean, np.float32), np.array(std, np.float32)


def _read_inputs(group, groups, rows: np.ndarray) -> np.ndarray:
    from sarflow.data.chipstore import read_masked

    parts = []
    for _, modality, bands in groups:
        arr = group[modality]
        parts.append(read_masked(arr, rows, [list(arr.attrs["bands"]).index(b) for b in bands]))
    return np.concatenate(parts, axis=1)


def to_positions(codes: np.ndarray, classes: list[int]) -> np.ndarray:
    """Label codes (NaN at nodata) -> positions of the declared classes, IGNORE elsewhere."""
    y = np.full(codes.shape, IGNORE, np.int64)
    for i, c in enumerate(classes):
        y[codes == c] = i
    return y


def not_evaluable(y: np.ndarray, k: int, split: str) -> str | None:
    """Why a split's labels (n, H, W class positions) cannot measure a segmentation, or None: too
    few chips, or fewer than two classes present in `MIN_CLASS_CHIPS` chips each (the rule of
    `tasks.not_evaluable`, on the classes a chip shows)."""
    n = len(y)
    if n < MIN_EVAL_CHIPS:
        return f"{split} split has {n} labelled chips (at least {MIN_EVAL_CHIPS} needed)"
    flat = y.reshape(n, -1)
    chips_with = np.array([(flat == i).any(axis=1).sum() for i in range(k)])
    if (chips_with >= MIN_CLASS_CHIPS).sum() < 2:
        return f"{split} split shows fewer than two classes in {MIN_CLASS_CHIPS}+ chips each (chips per class: " \
               f"{chips_with.tolist()})"
    return None


def load_data(cfg: SegmentConfig, groups, mean, std) -> SegData:
    """Train, val and test chips in memory (inputs in physical units), labels mapped to the positions
    of the label's declared classes (nodata and undeclared codes: IGNORE)."""
    from sarflow.data.chipstore import open_chip_group, read_chip_table, read_masked
    from sarflow.data.quicklook import class_colors

    group = open_chip_group(cfg.store)
    label = segmentation_label(group, cfg.store, cfg.label_modality)
    lab = group[label.name]
    classes = list(label.codes)
    table = read_chip_table(cfg.store)
    col = f"valid_{label.name}"
    labelled = table[table[col] > 0] if col in table.columns else table

    def rows(split):
        return np.sort(labelled.loc[labelled["split"] == split, "index"].to_numpy())

    train_rows, val_rows, test_rows = rows("train"), rows(cfg.val_split), rows(cfg.test_split)
    if not len(train_rows):
        raise InputError(cfg.store, f"no train chips with {label.name!r} labels")
    y_train = to_positions(read_masked(lab, train_rows)[:, 0], classes)
    seen = sorted(classes[i] for i in np.unique(y_train) if i != IGNORE)
    if len(seen) < 2:
        raise InputError(cfg.store, f"the train chips show {len(seen)} class(es) {seen} of label {label.name!r}: "
                                    "need at least 2 to train")
    codes_val = read_masked(lab, val_rows)[:, 0]
    codes_test = read_masked(lab, test_rows)[:, 0]
    y_test = to_positions(codes_test, classes)
    labelled_test = np.isfinite(codes_test)
    unknown = labelled_test & (y_test == IGNORE)
    if unknown.any():
        log.warning("%s: %d test pixel(s) of %r have codes %s that the label does not declare: ignored", cfg.store,
                    int(unknown.sum()), label.name, sorted(np.unique(codes_test[unknown]).astype(int).tolist()))
    ids = dict(zip(table["index"].tolist(), table["chip_id"].tolist()))
    colors = class_colors(label.classes)
    x_train, x_val, x_test = (_read_inputs(group, groups, r) for r in (train_rows, val_rows, test_rows))
    y_val = to_positions(codes_val, classes)
    blind = 0
    for x, y in ((x_train, y_train), (x_val, y_val), (x_test, y_test)):  # a pixel without input is neither
        no_input = ~np.isfinite(x).any(axis=1)  # learnt nor scored
        blind += int((no_input & (y != IGNORE)).sum())
        y[no_input] = IGNORE
    if blind:
        log.warning("%s: %d labelled pixel(s) have no input data: ignored in training and scoring", cfg.store, blind)
    return SegData(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                   torch.from_numpy(y_test), codes_test, classes, [f"{m}:{b}" for _, m, bands in groups for b in bands],
                   mean, std, [ids[int(r)] for r in test_rows], float(unknown.sum() / max(labelled_test.sum(), 1)),
                   x_val=torch.from_numpy(x_val), y_val=torch.from_numpy(y_val), label=label.name,
                   class_names=[c["name"] for c in label.classes], class_colors=colors,
                   channel_units=[str(group[m].attrs.get("units") or "") for _, m, bands in groups for _ in bands])

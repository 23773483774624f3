"""Segmentation inputs: the registered encoder, the input channels with the store's train statistics,
and the train and test chips in memory with labels mapped to contiguous class indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sarflow.downstream.segmentation.config import DEFAULT_GROUPS, SegmentConfig
from sarflow.downstream.segmentation.metrics import IGNORE
from sarflow.errors import InputError


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

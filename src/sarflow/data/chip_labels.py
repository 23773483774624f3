"""Per-chip label statistics of a chip store, for every label source the catalog declared:

- a categorical label `L`: `L__frac_<code>` for each declared class (its share of the chip's
  labelled pixels) and `L__labelled` (the share of the chip's pixels that carry a declared class);
- a continuous label `L`: `L__mean` (mean of its valid pixels, in its units).

Pixels are read with the store's one reader (nodata masked); a code that the legend does not
declare is not a class: it is counted, logged, and left out like nodata. The data layer's, so
pretraining's monitor reads them as the feature store's `chip_labels` source does
(`features.labels`).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def class_column(source: str, code: int) -> str:
    """`worldcover`, 10 -> `worldcover__frac_10` (a negative code -1 -> `..._frac_m1`)."""
    return f"{source}__frac_{code if code >= 0 else f'm{-code}'}"


def labelled_column(source: str) -> str:
    return f"{source}__labelled"


def mean_column(source: str) -> str:
    return f"{source}__mean"


def label_columns(group, where: str = "store") -> list[str]:
    """The label feature columns `chip_labels` writes for a store, in order."""
    from sarflow.data.chipstore import label_sources

    cols: list[str] = []
    for lab in label_sources(group, where):
        if lab.kind == "categorical":
            cols += [class_column(lab.name, c) for c in lab.codes] + [labelled_column(lab.name)]
        else:
            cols.append(mean_column(lab.name))
    return cols


def label_features(store: str) -> dict[str, np.ndarray]:
    """Every label column of `label_columns`, one value per store row (NaN where not measurable)."""
    from sarflow.data.chipstore import chip_shape, iter_masked, label_sources, open_chip_group

    group = open_chip_group(store)
    n = int(group.attrs["chips"])
    cols: dict[str, np.ndarray] = {}
    for lab in label_sources(group, store):
        arr = group[lab.name]
        if lab.kind == "categorical":
            codes = np.asarray(lab.codes, np.float32)
            counts = np.zeros((n, len(codes)))
            labelled = np.zeros(n)
            pixels = float(np.prod(chip_shape(arr)[2:]))
            unknown: dict[float, int] = {}
            for start, block in iter_masked(arr, n):
                flat = block[:, 0].reshape(len(block), -1)
                for j, code in enumerate(codes):
                    counts[start:start + len(block), j] = (flat == code).sum(axis=1)
                known = counts[start:start + len(block)].sum(axis=1)
                labelled[start:start + len(block)] = known / pixels
                stray = np.isfinite(flat) & ~np.isin(flat, codes)
                if stray.any():
                    for v, k in zip(*np.unique(flat[stray], return_counts=True)):
                        unknown[float(v)] = unknown.get(float(v), 0) + int(k)
            if unknown:
                log.warning("%s: label %r holds codes it does not declare, left out as nodata: %s", store, lab.name,
                            ", ".join(f"{v:g} ({k} px)" for v, k in sorted(unknown.items())))
            with np.errstate(invalid="ignore", divide="ignore"):
                fractions = counts / counts.sum(axis=1, keepdims=True)
            for j, code in enumerate(lab.codes):
                cols[class_column(lab.name, code)] = fractions[:, j]
            cols[labelled_column(lab.name)] = labelled
        else:
            means = np.full(n, np.nan)
            for start, block in iter_masked(arr, n):
                flat = block[:, 0].reshape(len(block), -1).astype(np.float64)
                ok = np.isfinite(flat).any(axis=1)
                with np.errstate(invalid="ignore"):
                    means[start:start + len(block)][ok] = np.nanmean(flat[ok], axis=1)
            cols[mean_column(lab.name)] = means
    return cols

"""Segmentation figures: predictions next to the truth for a few test chips, and the loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sarflow.downstream.segmentation.data import SegData
from sarflow.downstream.segmentation.metrics import IGNORE


def _code_cmap(data: SegData):
    """Black for ignored pixels, then each class in its declared colour (else a tab20 colour)."""
    from matplotlib.colors import ListedColormap

    from sarflow.data.quicklook import class_colors

    palette = data.class_colors or class_colors([{"code": c} for c in data.classes])
    return ListedColormap(["#000000"] + [palette[c] for c in data.classes])


def class_label(data: SegData, k: int) -> str:
    code = data.classes[k]
    name = data.class_names[k] if k < len(data.class_names) else str(code)
    return name if name == str(code) else f"{code} {name}"


def prediction_figure(data: SegData, preds: dict[str, torch.Tensor], path: Path, n: int = 4) -> Path:
    """Input (first channel), truth and each model's prediction for the first `n` test chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(data.x_test))
    cmap = _code_cmap(data)
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
    handles = [matplotlib.patches.Patch(color=cmap(k + 1), label=class_label(data, k)) for k in range(len(data.classes))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
    fig.suptitle(f"{data.label}: truth and predictions on test chips (black: no label)", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
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

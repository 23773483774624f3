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
    """The declared name of class position k (its code where the label declares no name)."""
    code = data.classes[k]
    return str(data.class_names[k]) if k < len(data.class_names) else str(code)


def prediction_fig(data: SegData, preds: dict[str, torch.Tensor], n: int = 4):
    """Input (first channel, one colour range with a colourbar in the store's units), truth and
    each model's prediction for the first `n` test chips, as a Figure; classes in their declared
    colours with a legend of their declared names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from sarflow.data.quicklook import add_colorbar, display_range, units_label

    n = min(n, len(data.x_test))
    cmap = _code_cmap(data)
    codes = np.array([0] + data.classes)

    def to_slot(idx: np.ndarray) -> np.ndarray:  # class index -> colour slot (0 = ignored/nodata)
        return np.where(idx == IGNORE, 0, idx + 1)

    cols = 2 + len(preds)
    fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols + 0.8, 2.1 * n + 0.9), squeeze=False, layout="constrained")
    x0 = data.x_test[:n, 0].numpy()
    lo, hi = display_range([x0], None)  # the 2-98 % percentiles, as the quicklook shows a source
    for i in range(n):
        im = axes[i, 0].imshow(x0[i], cmap="gray", vmin=lo, vmax=hi)
        panels = [("truth", data.y_test[i].numpy())] + [(k, p[i].numpy()) for k, p in preds.items()]
        for j, (_, idx) in enumerate(panels, start=1):
            axes[i, j].imshow(to_slot(idx), cmap=cmap, vmin=-0.5, vmax=len(codes) - 0.5, interpolation="nearest")
        for j, title in enumerate([data.channel_names[0]] + [name for name, _ in panels]):
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
        axes[i, 0].set_ylabel(data.test_chip_ids[i], fontsize=6)
    units = data.channel_units[0] if data.channel_units else None
    if n:
        add_colorbar(fig, im, list(axes[:, 0]), units_label(data.channel_names[0], units))
    handles = [Patch(facecolor=cmap(k + 1), edgecolor="0.4", lw=0.4, label=class_label(data, k)) for k in range(len(data.classes))]
    handles.append(Patch(facecolor=cmap(0), edgecolor="0.4", lw=0.4, label="no label / ignored"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7,
               title=f"{data.label} classes", title_fontsize=7)
    fig.suptitle(f"{data.label}: truth and predictions on test chips", fontsize=8)
    return fig


def prediction_figure(data: SegData, preds: dict[str, torch.Tensor], path: Path, n: int = 4) -> Path:
    """`prediction_fig` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = prediction_fig(data, preds, n)
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

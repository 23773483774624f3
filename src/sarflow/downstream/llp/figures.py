"""The LLP map and the bag-size curve, and the tables and figures written to the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.llp.data import LLPData, block_counts


def _colors(data: LLPData):
    """The classes' colours as the label declares them (else a palette), white for no data."""
    from matplotlib.colors import ListedColormap

    from sarflow.data.quicklook import class_colors

    palette = data.class_colors or class_colors([{"code": c} for c in data.classes])
    return ListedColormap([palette[int(c)] for c in data.classes] + ["#ffffff"])


def class_labels(data: LLPData) -> list[str]:
    """The classes' declared names, in the order of `data.classes` (the code where none is declared)."""
    names = data.class_names or [str(c) for c in data.classes]
    return [str(n) for n in names]


def _grid_image(values: np.ndarray, chips: pd.DataFrame, block: int = 1, fill=-1) -> np.ndarray:
    """Chip values (n,) or blocks (n, b, b) placed at their grid position; `fill` where no chip
    (-1: an integer image, NaN: a float one)."""
    col = chips["col"].to_numpy(int)
    row = chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    dtype = np.float64 if isinstance(fill, float) else np.int64
    img = np.full(((row.max() + 1) * block, (col.max() + 1) * block), fill, dtype=dtype)
    for i in range(len(chips)):
        v = values[i]
        img[row[i] * block:(row[i] + 1) * block, col[i] * block:(col[i] + 1) * block] = v
    return img


def _outline_test(ax, data: LLPData, test_rows: np.ndarray, img: np.ndarray) -> None:
    from matplotlib.patches import Rectangle

    col = data.chips["col"].to_numpy(int)
    row = data.chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    b = img.shape[0] // (row.max() + 1)
    for r in test_rows:
        ax.add_patch(Rectangle((col[r] * b - 0.5, row[r] * b - 0.5), b, b, fill=False, ec="k", lw=0.7))


def llp_map_figure(data: LLPData, results: dict, best: str, test_rows: np.ndarray):
    """The majority-class maps (truth, the best model's, and with the conv model the coarse ones)
    as a Figure, in the label's declared colours with a legend of its declared class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = len(data.classes)
    cmap = _colors(data)
    truth = np.where(data.truth_valid, data.truth.argmax(1), -1)
    pred = results[best]["pred"].argmax(1)
    panels = [("truth: chip majority class", _grid_image(truth, data.chips)),
              (f"LLP {best}: predicted majority", _grid_image(pred, data.chips))]
    conv = results.get("conv")
    if conv is not None and conv["coarse"] is not None and data.truth_map is not None:
        cm = conv["coarse"].argmax(1)
        b = cm.shape[1]
        counts = block_counts(data.truth_map, b, b, k)
        tm = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
        panels += [("truth downsampled", _grid_image(tm, data.chips, b)), ("LLP conv: coarse map", _grid_image(cm, data.chips, b))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), layout="constrained")
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        shown = np.where(img < 0, k, img)
        ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=k + 0.5, interpolation="nearest")
        _outline_test(ax, data, test_rows, img)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=cmap(i), edgecolor="0.4", lw=0.4, label=name) for i, name in enumerate(class_labels(data))]
    handles.append(Patch(facecolor="#ffffff", edgecolor="0.4", lw=0.4, label="no chip / no label"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(k + 1, 6), fontsize=8,
               title=f"{data.label} classes", title_fontsize=8)
    fig.suptitle(f"learning from label proportions: {data.label} (black outline: held-out test chips)", fontsize=10)
    return fig


MAX_PROPORTION_CLASSES = 6  # the proportion figure shows the classes with the largest truth share


def proportion_figure(data: LLPData, results: dict, best: str, test_rows: np.ndarray, max_classes: int = MAX_PROPORTION_CLASSES):
    """Per class (the `max_classes` with the largest mean truth share), the chips' true and
    predicted proportions as maps on one 0-1 scale with a colourbar (fraction of the chip's
    labelled pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = class_labels(data)
    share = np.nanmean(np.where(data.truth_valid[:, None], data.truth, np.nan), axis=0) if data.truth_valid.any() \
        else np.zeros(len(data.classes))
    order = [int(i) for i in np.argsort(-np.nan_to_num(share), kind="stable")[:max_classes]]
    pred = results[best]["pred"]
    fig, axes = plt.subplots(len(order), 2, figsize=(6.4, 2.6 * len(order) + 0.6), squeeze=False, layout="constrained")
    for r, i in enumerate(order):
        t = _grid_image(np.where(data.truth_valid, data.truth[:, i], np.nan), data.chips, fill=float("nan"))
        p = _grid_image(pred[:, i].astype(float), data.chips, fill=float("nan"))
        for c, (img, what) in enumerate(((t, "truth"), (p, f"LLP {best}"))):
            ax = axes[r, c]
            im = ax.imshow(img, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            _outline_test(ax, data, test_rows, img)
            ax.set_title(f"{names[i]}: {what}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    from sarflow.data.quicklook import add_colorbar

    add_colorbar(fig, im, list(axes.ravel()), "class proportion [fraction of the chip's labelled pixels, 0–1]")
    fig.suptitle(f"{data.label}: per-chip class proportions (black outline: test chips)", fontsize=9)
    return fig


def bag_curve_figure(curve: pd.DataFrame):
    """The bag-size curve as a Figure: test proportion MAE against mean chips per bag (log axis,
    ticks at the sizes tried, labels that would overlap left out) beside the mean-proportion baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarflow.data.quicklook import thin_tick_labels

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.mean_chips_per_bag, curve.proportion_mae, "o-", label=f"LLP {curve.model.iloc[0]}")
    ax.plot(curve.mean_chips_per_bag, curve.baseline_mae, "--", color="grey", label="mean-proportion baseline")
    ax.set_xscale("log")
    ax.set_xticks(curve.mean_chips_per_bag, [f"{v:.1f}" for v in curve.mean_chips_per_bag])
    ax.minorticks_off()
    ax.set_xlabel("mean chips per bag (log scale)")
    ax.set_ylabel("per-chip proportion MAE (test)")
    ax.legend()
    fig.tight_layout()
    thin_tick_labels(ax)
    return fig


def write_outputs(out: Path, table: pd.DataFrame, curve: pd.DataFrame | None, data: LLPData, results: dict,
                   best: str, test_rows: np.ndarray) -> tuple[Path, list[Path]]:
    table_path = out / "llp_results.csv"
    table.to_csv(table_path, index=False, float_format="%.5f")
    (out / "llp_results.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1, default=float))
    plots = [save_figure(llp_map_figure(data, results, best, test_rows), out / "llp_map.png"),
             save_figure(proportion_figure(data, results, best, test_rows), out / "llp_proportion_maps.png")]
    if curve is not None and len(curve):
        curve.to_csv(out / "bag_size_curve.csv", index=False, float_format="%.5f")
        plots.append(save_figure(bag_curve_figure(curve), out / "bag_size_curve.png"))
    return table_path, plots


def save_figure(fig, path: Path) -> Path:
    """A figure written as a PNG (90 dpi) and closed."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

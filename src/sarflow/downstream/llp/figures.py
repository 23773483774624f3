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
    names = data.class_names or [str(c) for c in data.classes]
    return [f"{c} {n}" if str(c) != n else n for c, n in zip(data.classes, names)]


def _grid_image(values: np.ndarray, chips: pd.DataFrame, block: int = 1) -> np.ndarray:
    """Chip values (n,) or blocks (n, b, b) placed at their grid position; -1 where no chip."""
    col = chips["col"].to_numpy(int)
    row = chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    img = np.full(((row.max() + 1) * block, (col.max() + 1) * block), -1, dtype=np.int64)
    for i in range(len(chips)):
        v = values[i]
        img[row[i] * block:(row[i] + 1) * block, col[i] * block:(col[i] + 1) * block] = v
    return img


def plot_llp_map(data: LLPData, results: dict, best: str, path: Path, test_rows: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    from matplotlib.patches import Rectangle

    col = data.chips["col"].to_numpy(int)
    row = data.chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        shown = np.where(img < 0, k, img)
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        b = img.shape[0] // (row.max() + 1)
        for r in test_rows:
            ax.add_patch(Rectangle((col[r] * b - 0.5, row[r] * b - 0.5), b, b, fill=False, ec="k", lw=0.7))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(k)]
    fig.legend(handles, class_labels(data), loc="lower center", ncol=min(k, 6), fontsize=8)
    fig.suptitle(f"learning from label proportions: {data.label} (black outline: held-out test chips)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curve(curve: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.mean_chips_per_bag, curve.proportion_mae, "o-", label=f"LLP {curve.model.iloc[0]}")
    ax.plot(curve.mean_chips_per_bag, curve.baseline_mae, "--", color="grey", label="mean-proportion baseline")
    ax.set_xscale("log")
    ax.set_xticks(curve.mean_chips_per_bag, [f"{v:.1f}" for v in curve.mean_chips_per_bag])
    ax.minorticks_off()
    ax.set_xlabel("mean chips per bag")
    ax.set_ylabel("per-chip proportion MAE (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(out: Path, table: pd.DataFrame, curve: pd.DataFrame | None, data: LLPData, results: dict,
                   best: str, test_rows: np.ndarray) -> tuple[Path, list[Path]]:
    table_path = out / "llp_results.csv"
    table.to_csv(table_path, index=False, float_format="%.5f")
    (out / "llp_results.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1, default=float))
    plots = [plot_llp_map(data, results, best, out / "llp_map.png", test_rows)]
    if curve is not None and len(curve):
        curve.to_csv(out / "bag_size_curve.csv", index=False, float_format="%.5f")
        plots.append(plot_curve(curve, out / "bag_size_curve.png"))
    return table_path, plots

"""Human-facing products: chip quicklooks and the demo's summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sarflow.data.chipstore import ChipStore

WORLDCOVER_COLORS = {10: "#006400", 20: "#ffbb22", 30: "#ffff4c", 40: "#f096ff", 50: "#fa0000", 60: "#b4b4b4",
                     70: "#f0f0f0", 80: "#0064c8", 90: "#0096a0", 95: "#00cf75", 100: "#fae6a0"}


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((a - lo) / (hi - lo), 0, 1)


def chip_quicklook(store: ChipStore, path: str | Path, n: int = 4) -> Path:
    """A PNG with n chips (rows) and one panel per modality (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    table = store.chips
    pick = table.sort_values(by=[c for c in table.columns if c.startswith("valid_")], ascending=False).head(n)
    mods = store.modalities
    fig, axes = plt.subplots(len(pick), len(mods), figsize=(2.2 * len(mods), 2.2 * len(pick)), squeeze=False)
    for r, (_, row) in enumerate(pick.iterrows()):
        for c, m in enumerate(mods):
            ax = axes[r, c]
            arr = store.array(m)
            chip = arr[int(row["index"])].astype("float32")
            units, kind = arr.attrs["units"], arr.attrs["kind"]
            if kind == "categorical" and units == "class":
                codes = sorted(WORLDCOVER_COLORS)
                lut = np.full(256, np.nan)
                for i, code in enumerate(codes):
                    lut[code] = i
                img = lut[np.nan_to_num(chip[0], nan=0).astype(int).clip(0, 255)]
                ax.imshow(img, cmap=ListedColormap([WORLDCOVER_COLORS[k] for k in codes]), vmin=0, vmax=len(codes) - 1,
                          interpolation="nearest")
            elif chip.shape[0] == 3 and units == "reflectance":
                ax.imshow(np.moveaxis(_stretch(chip, 0.0, 0.3), 0, -1))
            elif units == "dB":
                ax.imshow(chip[0], cmap="gray", vmin=-25, vmax=0)
            else:
                ax.imshow(chip[0], cmap="viridis")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{m}\n{arr.attrs['bands'][0]} [{units}]", fontsize=8)
        axes[r, 0].set_ylabel(row["chip_id"].rsplit("_", 2)[-2] + " " + row["chip_id"].rsplit("_", 1)[-1], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

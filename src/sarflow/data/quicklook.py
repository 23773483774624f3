"""Human-facing products: chip quicklooks and the demo's summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sarflow.data.chipstore import ChipStore, read_masked


def class_colors(classes) -> dict[int, str]:
    """Code -> colour of a label's declared classes ([{code, name, color}], as the store records
    them): the declared colour, else the next colour of matplotlib's tab20 palette that is not
    close to a declared one."""
    import matplotlib
    from matplotlib.colors import to_hex, to_rgb

    declared = [np.array(to_rgb(c["color"])) for c in classes if c.get("color")]
    tab = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    spare = [c for c in tab if all(np.linalg.norm(np.array(to_rgb(c)) - d) > 0.25 for d in declared)] or tab
    out, i = {}, 0
    for c in classes:
        if c.get("color"):
            out[int(c["code"])] = c["color"]
        else:
            out[int(c["code"])] = spare[i % len(spare)]
            i += 1
    return out


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
            chip = read_masked(arr, int(row["index"]))  # NaN at nodata
            units, kind = arr.attrs["units"], arr.attrs["kind"]
            if kind == "categorical" and arr.attrs.get("classes"):
                colors = class_colors(arr.attrs["classes"])
                codes = list(colors)
                img = np.full(chip[0].shape, np.nan)
                for i, code in enumerate(codes):
                    img[chip[0] == code] = i
                ax.imshow(img, cmap=ListedColormap([colors[k] for k in codes]), vmin=0, vmax=max(len(codes) - 1, 1),
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

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


def units_label(name: str, units: str | None) -> str:
    """A colourbar label: `name [units]` (the name alone when the store records no units)."""
    return f"{name} [{units}]" if units and str(units).strip() else name


def add_colorbar(fig, mappable, ax, label: str):
    """A colourbar beside `ax` (an axes or a list of them) labelled `label`; returns it."""
    cb = fig.colorbar(mappable, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label(label, fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return cb


def class_handles(classes, present=None) -> list:
    """Legend patches of a label's declared classes ([{code, name, color}], in declared order):
    each class's declared name and colour (`class_colors`); only the codes in `present` when given."""
    from matplotlib.patches import Patch

    colors = class_colors(classes)
    keep = None if present is None else {int(c) for c in present}
    return [Patch(facecolor=colors[int(c["code"])], edgecolor="0.4", linewidth=0.4,
                  label=str(c.get("name") or c["code"]))
            for c in classes if keep is None or int(c["code"]) in keep]


def thin_tick_labels(ax, axis: str = "x", keep_last: bool = True) -> list[str]:
    """Blanks tick labels that would overlap a kept one once drawn (the first and, with
    `keep_last`, the last are kept); returns the labels left. Draws the figure to measure."""
    fig = ax.figure
    fig.canvas.draw()
    ticks = (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ticks]
    order = list(range(len(ticks)))
    if keep_last and len(order) > 1:
        order = [order[-1]] + order[:-1]
    kept: list[int] = []
    for i in order:
        if not ticks[i].get_text():
            continue
        if all(not boxes[i].expanded(1.15, 1.0).overlaps(boxes[j]) for j in kept):
            kept.append(i)
    texts = [t.get_text() if i in kept else "" for i, t in enumerate(ticks)]
    locs = ax.get_xticks() if axis == "x" else ax.get_yticks()
    (ax.set_xticks if axis == "x" else ax.set_yticks)(locs, texts)
    return [t for t in texts if t]


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((a - lo) / (hi - lo), 0, 1)


def display_range(chips: list[np.ndarray], declared) -> tuple[float, float]:
    """The colour range of a column: the source's declared `range`, else the 2-98 % percentiles
    of the values shown (one range for every row, so one colourbar reads them all)."""
    if declared:
        return float(declared[0]), float(declared[1])
    vals = np.concatenate([c[np.isfinite(c)].ravel() for c in chips]) if chips else np.array([])
    if not len(vals):
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [2, 98]))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def quicklook_figure(store: ChipStore, n: int = 4):
    """The quicklook as a matplotlib Figure: n chips (rows), one column per source. A continuous
    source's column has one colour range and a colourbar labelled with its band and the store's
    `units`; a three-band reflectance source is an RGB composite of its bands in store order (the
    title names them and the stretch); a categorical source is drawn in its declared classes'
    colours with a legend of their declared names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    table = store.chips
    pick = table.sort_values(by=[c for c in table.columns if c.startswith("valid_")], ascending=False).head(n)
    mods = store.modalities
    fig, axes = plt.subplots(len(pick), len(mods), figsize=(2.6 * len(mods) + 0.6, 2.2 * len(pick) + 0.9),
                             squeeze=False, layout="constrained")
    rows = [int(r) for r in pick["index"]]
    for c, m in enumerate(mods):
        arr = store.array(m)
        chips = [read_masked(arr, r) for r in rows]  # NaN at nodata
        units, kind, bands = arr.attrs.get("units"), arr.attrs["kind"], list(arr.attrs["bands"])
        col = axes[:, c]
        if kind == "categorical" and arr.attrs.get("classes"):
            classes = arr.attrs["classes"]
            colors = class_colors(classes)
            codes = list(colors)
            cmap = ListedColormap([colors[k] for k in codes])
            for ax, chip in zip(col, chips):
                img = np.full(chip[0].shape, np.nan)
                for i, code in enumerate(codes):
                    img[chip[0] == code] = i
                ax.imshow(img, cmap=cmap, vmin=-0.5, vmax=len(codes) - 0.5, interpolation="nearest")
            present = set(np.unique(np.concatenate([ch[0][np.isfinite(ch[0])].ravel() for ch in chips])).astype(int))
            col[-1].legend(handles=class_handles(classes, present), loc="upper center", bbox_to_anchor=(0.5, -0.04),
                           fontsize=6, frameon=False, title="classes", title_fontsize=6)
            title = f"{m}\n{bands[0]}"
        elif len(bands) == 3 and units == "reflectance":
            lo, hi = display_range(chips, None)
            for ax, chip in zip(col, chips):
                ax.imshow(np.nan_to_num(np.moveaxis(_stretch(chip, lo, hi), 0, -1)))
            title = f"{m}\nRGB = {', '.join(bands)}\n[{units} {lo:.3g}–{hi:.3g}]"
        else:
            lo, hi = display_range([ch[0] for ch in chips], arr.attrs.get("range"))
            cmap = "gray" if units == "dB" else "viridis"
            for ax, chip in zip(col, chips):
                im = ax.imshow(chip[0], cmap=cmap, vmin=lo, vmax=hi)
            add_colorbar(fig, im, list(col), units_label(bands[0], units))
            more = f" (1 of {len(bands)} bands)" if len(bands) > 1 else ""
            title = f"{m}\n{bands[0]}{more}"
        col[0].set_title(title, fontsize=8)
        for ax in col:
            ax.set_xticks([]), ax.set_yticks([])
    for r, (_, row) in enumerate(pick.iterrows()):
        axes[r, 0].set_ylabel(row["chip_id"].rsplit("_", 2)[-2] + " " + row["chip_id"].rsplit("_", 1)[-1], fontsize=7)
    return fig


def chip_quicklook(store: ChipStore, path: str | Path, n: int = 4) -> Path:
    """A PNG with n chips (rows) and one panel per modality (columns) (`quicklook_figure`)."""
    import matplotlib.pyplot as plt

    fig = quicklook_figure(store, n)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

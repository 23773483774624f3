"""Figures a scientist would publish: the real matplotlib figures are inspected. Continuous maps
have a colourbar labelled with the store's units, categorical maps a legend of the label's
declared class names in their colours (a catalog with made-up names and codes: nothing depends
on the demo's), the label-efficiency curves say what the shaded band is and their tick labels do
not overlap once drawn, and the results report shows plots without a fixed pixel width."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

# a label whose codes and names are nobody's legend; one colour declared, two left to the palette
CLASSES = {3: {"name": "Heath", "color": "#aa5500"}, 7: "Bog", 12: "Scrub"}
NAMES = ["Heath", "Bog", "Scrub"]


def _colorbar_labels(fig) -> list[str]:
    """The labels of the figure's colourbars (the axes a colourbar draws into)."""
    return [a.get_ylabel() or a.get_xlabel() for a in fig.axes if getattr(a, "_colorbar", None) is not None]


def _legend_texts(fig) -> list[list[str]]:
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    return [[t.get_text() for t in lg.get_texts()] for lg in legends]


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    """A 128 px scene tiled into 16 chips of 32 px: `radar` (HH, HV in dB), `optic` (three
    reflectance bands p1, p2, p3), `height` (m) and the label `habitat` (codes 3, 7, 12
    in stripes, so every chip shows every class; nodata 0)."""
    import rasterio
    import yaml
    from rasterio.transform import from_origin

    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    folder = tmp_path_factory.mktemp("odd")
    size, x0, y0, res = 128, 499840.0, 4300160.0, 10.0
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    habitat = np.choose((xx // 5) % 3, [3, 7, 12]).astype(np.int16)
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32615", transform=from_origin(x0, y0, res, res))
    rasters = {"radar": rng.normal(-12, 3, (2, size, size)), "optic": rng.uniform(0.01, 0.3, (3, size, size)),
               "height": (xx / size * 30.0)[None]}
    for name, a in rasters.items():
        with rasterio.open(folder / f"{name}.tif", "w", count=len(a), dtype="float32", nodata=float("nan"), **profile) as ds:
            ds.write(a.astype(np.float32))
    with rasterio.open(folder / "habitat.tif", "w", count=1, dtype="int16", nodata=0, **profile) as ds:
        ds.write(habitat[None])
    sources = [{"name": "radar", "uris": ["radar.tif"], "bands": ["HH", "HV"], "units": "dB", "kind": "continuous"},
               {"name": "optic", "uris": ["optic.tif"], "bands": ["p1", "p2", "p3"], "units": "reflectance",
                "kind": "continuous"},
               {"name": "height", "uris": ["height.tif"], "bands": ["h_top"], "units": "m", "kind": "continuous"},
               {"name": "habitat", "uris": ["habitat.tif"], "bands": ["habitat"], "units": "class", "kind": "categorical",
                "classes": CLASSES, "nodata": 0}]
    (folder / "catalog.yaml").write_text(yaml.safe_dump(
        {"grid": {"crs": 32615, "resolution": res, "chip_size": 32, "aoi": "intersection"}, "sources": sources},
        sort_keys=False))
    return tile(load_catalog(folder / "catalog.yaml"), folder / "chips.zarr", TileOptions(), show_progress=False)


def test_quicklook_has_unit_colourbars_declared_class_legend_and_composite_title(odd_store, tmp_path):
    from sarflow.data.chipstore import open_store
    from sarflow.data.quicklook import chip_quicklook, quicklook_figure

    store = open_store(odd_store)
    fig = quicklook_figure(store, n=3)
    labels = _colorbar_labels(fig)
    assert sorted(labels) == ["HH [dB]", "h_top [m]"]  # every continuous map but the RGB composite
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    optic = next(t for t in titles if t.startswith("optic"))
    assert "RGB = p1, p2, p3" in optic and "reflectance" in optic  # the composite, not its first band
    assert any(t.startswith("radar") and "HH" in t for t in titles)
    legends = _legend_texts(fig)
    assert legends == [NAMES]  # declared names in declared order, no codes
    legend = next(a.get_legend() for a in fig.axes if a.get_legend() is not None)
    colours = [to_hex(h.get_facecolor()) for h in legend.legend_handles]
    assert colours[0] == "#aa5500" and len(set(colours)) == 3
    plt.close(fig)
    png = chip_quicklook(store, tmp_path / "q.png", n=3)
    assert plt.imread(png).shape[1] > 500


def _llp_data():
    from sarflow.downstream.llp.data import LLPData

    chips = pd.DataFrame({"chip_id": [f"c{i}" for i in range(6)], "index": range(6), "col": [0, 1, 2, 0, 1, 2],
                          "row": [0, 0, 0, 1, 1, 1], "split": ["train"] * 4 + ["test"] * 2})
    truth = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.25, 0.75], [0, 0, 1], [0.2, 0.3, 0.5]])
    data = LLPData(chips=chips, bags=None, bag_pixels=None, bag_xy=None, classes=[3, 7, 12], truth=truth,
                   truth_valid=np.ones(6, bool), label="habitat", class_names=NAMES,
                   class_colors={3: "#aa5500", 7: "#1f77b4", 12: "#2ca02c"})
    return data, {"mlp": {"pred": truth[::-1].copy()}}


def test_llp_map_names_the_declared_classes_and_the_proportion_maps_have_a_scale():
    from sarflow.downstream.llp.figures import llp_map_figure, proportion_figure

    data, results = _llp_data()
    fig = llp_map_figure(data, results, "mlp", np.array([4, 5]))
    assert _legend_texts(fig) == [NAMES + ["no chip / no label"]]
    colours = [to_hex(h.get_facecolor()) for h in fig.legends[0].legend_handles]
    assert colours[:3] == ["#aa5500", "#1f77b4", "#2ca02c"]
    plt.close(fig)

    fig = proportion_figure(data, results, "mlp", np.array([4, 5]))
    assert _colorbar_labels(fig) == ["class proportion [fraction of the chip's labelled pixels, 0–1]"]
    # the first panel is the class with the largest mean share (Scrub), truth at the chips' grid cells
    first = fig.axes[0]
    assert first.get_title() == "Scrub: truth"
    np.testing.assert_allclose(first.images[0].get_array(), [[0, 0, 0], [0.75, 1, 0.5]])
    assert first.images[0].get_clim() == (0, 1)
    plt.close(fig)


def test_segmentation_figure_has_an_input_colourbar_in_the_stores_units_and_class_names():
    from sarflow.downstream.segmentation.data import SegData
    from sarflow.downstream.segmentation.figures import prediction_fig

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(-10, 2, (2, 2, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, (2, 8, 8)))
    data = SegData(x_train=x, y_train=y, x_test=x, y_test=y, codes_test=np.zeros((2, 8, 8)), classes=[3, 7, 12],
                   channel_names=["radar:HH", "radar:HV"], mean=np.zeros(2), std=np.ones(2), test_chip_ids=["a", "b"],
                   unknown_test_fraction=0.0, label="habitat", class_names=NAMES,
                   class_colors={3: "#aa5500", 7: "#1f77b4", 12: "#2ca02c"}, channel_units=["dB", "dB"])
    fig = prediction_fig(data, {"unet": y}, n=2)
    assert _colorbar_labels(fig) == ["radar:HH [dB]"]
    assert _legend_texts(fig) == [NAMES + ["no label / ignored"]]
    assert [to_hex(h.get_facecolor()) for h in fig.legends[0].legend_handles][:3] == ["#aa5500", "#1f77b4", "#2ca02c"]
    plt.close(fig)


def _boxes_overlap(ax) -> list[tuple[str, str]]:
    fig = ax.figure
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    shown = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    boxes = [t.get_window_extent(r) for t in shown]
    return [(shown[i].get_text(), shown[j].get_text()) for i in range(len(shown)) for j in range(i + 1, len(shown))
            if boxes[i].overlaps(boxes[j])]


def test_label_efficiency_curve_explains_its_band_and_its_ticks_do_not_overlap():
    from sarflow.downstream.label_efficiency import curve_figure
    from sarflow.downstream.tasks import Task

    task = Task("habitat_presence", "habitat", "multilabel", "map", True, (3, 7, 12), tuple(NAMES))
    rows = []
    for source, probe, shift in (("embeddings", "logistic", 0.1), ("pixel_stats", "logistic", 0.0)):
        for n in (25, 50, 100, 200, 210, 228):  # 200 and 210 are too close on a log axis to label both
            for split in ("val", "test"):
                m = 0.5 + shift + 0.05 * np.log(n)
                rows.append({"task": task.name, "source": source, "probe": probe, "n": n, "is_all": n == 228,
                             "split": split, "metric": "map", "mean": m, "std": 0.01, "draws": 3,
                             "ci_low": m - 0.03, "ci_high": m + 0.03})
    fig = curve_figure(pd.DataFrame(rows), task)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert _boxes_overlap(ax) == []
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown[0] == "25" and shown[-1] == "228\n(all)" and len(shown) < 6  # a colliding one is left out
    assert len(ax.get_xticks()) == 6  # every size tried keeps its tick
    captions = " ".join(t.get_text() for t in ax.texts)
    assert "shaded: 95 % interval" in captions and "spatial test blocks" in captions
    assert "95 % block-bootstrap interval" in _legend_texts(fig)[0]
    assert len(ax.collections) == 2  # one band per source
    plt.close(fig)


def test_bag_size_curve_ticks_do_not_overlap():
    from sarflow.downstream.llp.figures import bag_curve_figure

    sizes = [1.0, 1.1, 1.2, 2.0, 4.0, 8.0]  # the first three are too close on a log axis to label all
    curve = pd.DataFrame({"mean_chips_per_bag": sizes, "proportion_mae": np.linspace(0.1, 0.2, 6),
                          "baseline_mae": [0.3] * 6, "model": ["mlp"] * 6})
    fig = bag_curve_figure(curve)
    ax = fig.axes[0]
    assert _boxes_overlap(ax) == []
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown[0] == "1.0" and shown[-1] == "8.0" and len(shown) < 6 and len(ax.get_xticks()) == 6
    plt.close(fig)


@pytest.mark.slow  # imports the training stack (lightning)
def test_mae_figure_has_colourbars_naming_the_band_and_its_units():
    from types import SimpleNamespace

    from sarflow.training.methods import Group
    from sarflow.training.pretrain import mae_reconstruction_fig

    module = SimpleNamespace(groups=[Group("g", "radar", ["HH", "HV"])], norm_pix_loss=True, mask_ratio=0.6)
    r = {k: np.random.default_rng(0).normal(size=(2, 8, 8)) for k in ("input", "masked", "target", "prediction", "hidden")}
    fig = mae_reconstruction_fig(module, r, "dB")
    labels = _colorbar_labels(fig)
    assert labels == ["z-score of radar HH (dB) [train-split standard deviations]",
                      "radar HH, per-patch normalised [standard deviations]"]
    titles = [a.get_title() for a in fig.axes[:4]]
    assert titles[0] == "input: radar HH" and titles[1] == "visible 40 % of patches"
    plt.close(fig)


def test_report_html_shows_wide_plots_at_the_pages_width_and_no_fixed_pixel_width(tmp_path):
    from sarflow.downstream.results_report import SECTIONS, SourceRun, _html

    wide, small = tmp_path / "map.png", tmp_path / "loss.png"
    for path, inches in ((wide, 12), (small, 4)):
        fig = plt.figure(figsize=(inches, 3))
        fig.savefig(path, dpi=90)
        plt.close(fig)
    src = SourceRun("r1", "probes", "exp", "2026-01-01 00:00 UTC", "v1", tmp_path, {})
    page = _html("t", [(SECTIONS[0], [src], pd.DataFrame({"a": [1.0]}), [wide, small])])
    rules = re.findall(r"img[^{]*\{([^}]*)\}", page)
    assert rules and not any(re.search(r"width:\s*\d+px", rule) for rule in rules)
    imgs = re.findall(r"<img[^>]*>", page)
    assert "class='wide'" in imgs[0] and "class=" not in imgs[1]
    assert "img.wide{width:100%}" in page

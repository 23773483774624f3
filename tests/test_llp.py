"""Learning from label proportions on synthetic bags with known chip truth, and the KDM layer."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from sarflow.downstream.llp.bags import bag_matrix, chip_bags
from sarflow.downstream.llp.kdm import KDM
from sarflow.downstream.llp.metrics import evaluate_proportions
from sarflow.downstream.llp.models import InstanceClassifier, StridedConvLLP
from sarflow.downstream.llp.train import bag_loss, select_steps, train_llp

CLASSES = [10, 20, 30, 40, 50, 60, 80, 90]


@pytest.fixture(scope="module")
def llp_case(tmp_path_factory):
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile import TileOptions, tile

    tmp = tmp_path_factory.mktemp("llp")
    cat = synthesize(tmp / "scene", SynthConfig(size_px=512, seed=21, chip_size=32, municipality_km2=0.4,
                                                cloud_fraction=0.0))
    store = tile(load_catalog(cat), tmp / "chips.zarr", TileOptions(), show_progress=False)
    g = zarr.open_group(str(store), mode="r")
    chips = pd.read_parquet(store / "chips.parquet").sort_values("index")
    bags = chip_bags(chips, g.attrs["crs"], gpd.read_file(cat.parent / "municipalities.geojson"), "muni_id",
                     pd.read_csv(cat.parent / "municipality_stats.csv"), CLASSES)
    wc = g["worldcover"][:][:, 0].reshape(len(chips), -1)
    valid = (wc > 0).sum(axis=1, keepdims=True)
    truth = np.stack([(wc == c).sum(axis=1) for c in CLASSES], axis=1) / np.maximum(valid, 1)
    s1, s2 = g["s1grd"][:].astype(np.float32), g["s2rgb"][:].astype(np.float32)
    feats = np.concatenate([np.nanmean(s1, axis=(2, 3)), np.nanstd(s1, axis=(2, 3)), np.nanmean(s2, axis=(2, 3)),
                            np.nanstd(s2, axis=(2, 3))], axis=1)
    feats = (feats - np.nanmean(feats, 0)) / (np.nanstd(feats, 0) + 1e-6)
    pixels = np.nan_to_num(np.concatenate([(s1 + 12) / 5, (s2 - 0.1) / 0.1], axis=1))
    return {"chips": chips, "bags": bags, "truth": truth, "x": torch.tensor(np.nan_to_num(feats), dtype=torch.float32),
            "pixels": torch.tensor(pixels), "n": len(chips)}


def test_bag_weights_sum_to_one_and_outside_chips_are_reported(llp_case):
    bags = llp_case["bags"]
    sums = bags.members.groupby("chip_id")["weight"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    assert (bags.members.groupby("chip_id").size() > 1).any()  # chips on borders belong to several bags
    # a chip outside every polygon is reported, not dropped silently
    chips = llp_case["chips"].copy()
    far = chips.iloc[:1].copy()
    far[["minx", "maxx"]] += 1e6
    far["chip_id"] = "far-away"
    poly = gpd.GeoDataFrame({"muni_id": ["M0001"]}, geometry=[gpd.GeoSeries.from_xy([0], [0]).buffer(1).iloc[0]],
                            crs="EPSG:4326")
    stats = pd.DataFrame({"muni_id": ["M0001"], **{f"frac_{c}": [1.0 / len(CLASSES)] for c in CLASSES}})
    out = chip_bags(pd.concat([far]), "EPSG:32632", poly, "muni_id", stats, CLASSES)
    assert out.outside == ["far-away"] and out.members.empty


def _setup(case):
    bags = case["bags"]
    row_of = {int(i): r for r, i in enumerate(case["chips"]["index"])}
    a, ids = bag_matrix(bags, case["n"], row_of)
    target = torch.tensor(bags.proportions.loc[ids].to_numpy(), dtype=torch.float32)
    mean_prop = target.mean(dim=0).numpy()
    return a, target, mean_prop


@pytest.mark.parametrize("model_name", ["linear", "mlp", "kdm", "conv"])
def test_llp_recovers_chip_labels_better_than_the_mean_baseline(llp_case, model_name):
    torch.manual_seed(0)
    a, target, mean_prop = _setup(llp_case)
    x, k = llp_case["x"], len(CLASSES)
    if model_name == "linear":
        model, inp = InstanceClassifier(x.shape[1], k), x
    elif model_name == "mlp":
        model, inp = InstanceClassifier(x.shape[1], k, hidden=32), x
    elif model_name == "kdm":
        model, inp = KDM.from_data(x, k, n_prototypes=48), x
    else:
        model, inp = StridedConvLLP(llp_case["pixels"].shape[1], k), llp_case["pixels"]
        assert sum(p.numel() for p in model.parameters()) < 6000
    history = train_llp(model, inp, a, target, loss="kl", steps=300, lr=0.03)
    assert history[-1] < history[0]
    with torch.no_grad():
        pred = model.instance(inp).numpy()
    metrics = evaluate_proportions(pred, llp_case["truth"], mean_prop)
    assert metrics["proportion_mae"] < 0.8 * metrics["baseline_mae"], metrics


def test_select_steps_picks_the_lowest_held_out_bag_loss(llp_case):
    a, target, _ = _setup(llp_case)
    x, k = llp_case["x"], len(CLASSES)

    def make():
        torch.manual_seed(0)
        return InstanceClassifier(x.shape[1], k)

    choice = select_steps(make, x, a, target, steps=95, lr=0.1, seed=3, val_fraction=0.25, every=10)
    best, curve = choice.steps, choice.curve
    assert [s for s, _ in curve] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert best == min(curve, key=lambda c: c[1])[0]
    # the held-out loss is the loss of the model trained on the other bags only: recompute it at `best`
    order = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(3))
    n_val = round(0.25 * a.shape[0])
    val, fit = order[:n_val], order[n_val:]
    model = make()
    train_llp(model, x, a[fit], target[fit], steps=best, lr=0.1, seed=3)
    with torch.no_grad():
        pred = a[val] @ model.instance(x)
        held_out = bag_loss(pred, target[val], "kl").item()
    assert held_out == pytest.approx(dict(curve)[best], rel=1e-4)
    # the held-out bags' proportion MAE at that step is what models are compared by (validation, not test)
    assert choice.val_mae == pytest.approx((pred - target[val]).abs().mean().item(), rel=1e-4)
    assert choice.val_bags == n_val
    assert select_steps(make, x, a, target, steps=95, lr=0.1, seed=3) == choice  # deterministic
    none = select_steps(make, x, a[:2], target[:2], steps=40)  # too few bags to hold any out
    assert (none.steps, none.curve, none.val_bags) == (40, [], 0) and np.isnan(none.val_mae)
    assert select_steps(make, x, a, target, steps=40, val_fraction=0).steps == 40


def test_kdm_bag_prediction_is_the_weighted_mean_of_instance_predictions():
    torch.manual_seed(0)
    kdm = KDM.from_data(torch.randn(200, 6), n_classes=4, n_prototypes=16)
    for trial in range(20):
        n = int(torch.randint(1, 30, (1,)))
        x = torch.randn(n, 6) * (1 + trial / 10)
        alpha = torch.rand(n)
        torch.testing.assert_close(kdm(x, alpha), (alpha / alpha.sum()) @ kdm.instance(x))
        torch.testing.assert_close(kdm(x), kdm.instance(x).mean(dim=0))
        assert torch.allclose(kdm(x, alpha).sum(), torch.tensor(1.0))


def test_kdm_gradients_reach_prototypes_and_sigma():
    kdm = KDM.from_data(torch.randn(100, 5), n_classes=3, n_prototypes=10)
    x, target = torch.randn(12, 5), torch.tensor([[0.2, 0.5, 0.3]])
    bag_loss(kdm(x)[None], target, "kl").backward()
    for name in ("c_x", "c_y_logits", "w_logits", "log_sigma"):
        grad = getattr(kdm, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_bag_losses_are_zero_only_at_the_target():
    t = torch.tensor([[0.1, 0.6, 0.3]])
    for kind in ("kl", "mse"):
        assert bag_loss(t, t, kind) < 1e-5 and bag_loss(torch.tensor([[0.3, 0.4, 0.3]]), t, kind) > 1e-3
    assert bag_loss(t, t, "ce") < bag_loss(torch.tensor([[0.3, 0.4, 0.3]]), t, "ce")
    with pytest.raises(ValueError):
        bag_loss(t, t, "hinge")

"""Segmentation downstream: mIoU by hand, ViT head vs U-Net on the tiny store, MLflow, errors, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr

from sarflow.downstream.models import dataset_id
from sarflow.downstream.segmentation.config import SegmentConfig
from sarflow.downstream.segmentation.data import load_encoder, resolve_inputs
from sarflow.downstream.segmentation.metrics import IGNORE, confusion_matrix, miou, segmentation_scores
from sarflow.downstream.segmentation.models import UNet, ViTSegmenter
from sarflow.downstream.segmentation.run import run_segmentation
from sarflow.errors import InputError

# ---------------------------------------------------------------- metrics


def test_miou_matches_a_hand_computed_example_and_ignores_nodata():
    I = IGNORE
    truth = np.array([[0, 0, 1, 1],
                      [0, 2, 2, I]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 3]])  # 4 classes; class 3 is predicted only on an ignored pixel
    cm = confusion_matrix(truth, pred, n_classes=4)
    assert cm.sum() == 7 and cm[0, 0] == 2 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[3].sum() == 0
    s = segmentation_scores(cm)
    # class 0: TP 2, FP 1 (a 2 predicted 0), FN 1 -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    # class 3: absent from truth and (non-ignored) prediction -> not counted
    assert s["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5]) and math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    # changing the prediction on the ignored pixel changes nothing
    for other in range(4):
        p2 = pred.copy()
        p2[1, 3] = other
        assert miou(truth, p2, 4) == pytest.approx(s["miou"])
    # a class predicted on a labelled pixel but absent from truth counts, with IoU 0
    p3 = pred.copy()
    p3[0, 0] = 3
    s3 = segmentation_scores(confusion_matrix(truth, p3, 4))
    assert s3["iou"][3] == 0.0 and s3["miou"] == pytest.approx(np.mean([1 / 4, 2 / 3, 1 / 2, 0.0]))
    assert miou(truth, truth, 4) == 1.0


def test_models_take_physical_chips_with_nan_and_keep_the_chip_size():
    unet = UNet(2, [10, 30, 80], mean=[-10.0, -17.0], std=[3.0, 3.0], widths=(8, 16, 32))
    x = torch.full((2, 2, 20, 28), -12.0)
    x[0, :, :5] = float("nan")  # missing pixels
    p = unet(x)
    assert p.shape == (2, 3, 20, 28) and torch.isfinite(p).all()  # sizes not divisible by 4 are padded
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2, 20, 28))
    assert set(unet.predict_codes(x).unique().tolist()) <= {10, 30, 80}


# ---------------------------------------------------------------- training on the tiny store

TINY_ENCODER = dict(size="tiny", patch=8, depth=2, dim=32, heads=2)


@pytest.fixture(scope="module")
def encoder(tiny_store, tmp_path_factory):
    """A tiny MAE encoder registered in a fresh MLflow database."""
    from sarflow.training.methods import OptimConfig
    from sarflow.training.pretrain import PretrainConfig, pretrain
    from sarflow.training.vit import ViTConfig

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    r = pretrain(PretrainConfig(store=str(tiny_store), method="mae", vit=ViTConfig(**TINY_ENCODER), batch_size=16,
                                optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=6), tracking_uri=uri,
                                method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
    return uri, f"models:/{r['registered_model']}/{r['version']}"


@pytest.fixture(scope="module")
def result(tiny_store, encoder):
    uri, enc = encoder
    return run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri, encoder_uri=enc, steps=80,
                                          batch_size=16, threads=1, seed=0))


def test_both_models_learn_and_beat_the_majority_class(result):
    assert result["classes"] == sorted(result["classes"]) and 0 not in result["classes"]
    assert set(result["classes"]) <= {10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}
    for kind in ("vit", "unet"):
        r = result[kind]
        losses = r["losses"]
        assert len(losses) == 80 and all(math.isfinite(v) for v in losses)
        assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), kind
        assert 0.0 <= r["test_miou"] <= 1.0 and 0.0 <= r["test_pixel_accuracy"] <= 1.0
        assert r["test_miou"] > result["majority_baseline"]["miou"], kind
        assert set(r["iou"]) == set(result["classes"])
        assert np.asarray(r["confusion"]).shape == (len(result["classes"]),) * 2
    # the model to register is chosen on the val split; the test split is only scored
    assert result["best"] == max(("vit", "unet"), key=lambda k: (result[k]["val_miou"], k == "vit"))
    assert result["selection"] == "best mIoU on the val split" and result["not_evaluable"] == {}
    assert result["task"] == "segmentation-worldcover" and len(result["class_names"]) == len(result["classes"])
    # fine-tuning trains the encoder too
    assert result["vit"]["trainable_params"] == result["vit"]["params"]


def test_runs_carry_lineage_metrics_and_figures_and_the_best_model_is_registered(result, encoder, tiny_store):
    import mlflow

    uri, enc = encoder
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    g = zarr.open_group(str(tiny_store), mode="r")
    for kind in ("vit", "unet"):
        run = client.get_run(result[kind]["run_id"])
        assert run.data.tags["sarflow.catalog_hash"] == g.attrs["catalog_hash"]
        assert run.data.tags["sarflow.segmentation.model"] == kind
        assert run.data.metrics["test_miou"] == pytest.approx(result[kind]["test_miou"])
        assert "test_pixel_accuracy" in run.data.metrics and "baseline_majority_miou" in run.data.metrics
        assert any(k.startswith("test_iou_") for k in run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 80
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/predictions.png", "figures/loss_curves.png"} <= arts
        assert "confusion_matrix.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert result["vit"]["model_uri"] != result["unet"]["model_uri"]
    reg = result["registered"]
    assert reg["name"] == "sarflow-segmentation-worldcover" and reg["model"] == result["best"]
    assert result["models"] == {reg["name"]: {"version": reg["version"], "metric": "test_miou", "higher_is_better": True}}
    mv = client.get_model_version(reg["name"], reg["version"])
    assert mv.tags["sarflow.classes"] == ",".join(map(str, result["classes"]))
    assert float(mv.tags["sarflow.metric.test_miou"]) == pytest.approx(result[result["best"]]["test_miou"])
    assert mv.tags["sarflow.eval_set"] == f"{dataset_id(mv.tags)}:test:segmentation-worldcover"
    assert client.get_run(result[result["best"]]["run_id"]).data.metrics["val_miou"] == pytest.approx(
        result[result["best"]]["val_miou"])

    # the registered model takes chips straight from the store (physical units, NaN) -> per-pixel output
    from sarflow.data.chipstore import read_masked

    groups, _, _ = resolve_inputs(SegmentConfig(store=str(tiny_store), encoder_uri=enc), load_encoder(enc))
    x = np.concatenate([read_masked(g[m], slice(0, 3), [list(g[m].attrs["bands"]).index(b) for b in bands])
                        for _, m, bands in groups], axis=1)
    x[0, :, :4] = np.nan
    model = mlflow.pytorch.load_model(f"models:/{reg['name']}/{reg['version']}")
    assert isinstance(model, (ViTSegmenter, UNet)) and model.class_codes == result["classes"]
    with torch.no_grad():
        probs = model(torch.from_numpy(x))
        codes = model.predict_codes(torch.from_numpy(x))
    assert probs.shape == (3, len(result["classes"]), 32, 32) and torch.isfinite(probs).all()
    assert codes.shape == (3, 32, 32) and set(codes.unique().tolist()) <= set(result["classes"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg['version']}")
    out = np.asarray(pyfunc.predict(x))
    assert out.shape == (3, len(result["classes"]), 32, 32)
    np.testing.assert_allclose(out, probs.numpy(), rtol=1e-4, atol=1e-5)


def test_frozen_encoder_trains_only_the_head(tiny_store, encoder):
    from sarflow.downstream.segmentation.data import load_data, load_encoder, resolve_inputs
    from sarflow.downstream.segmentation.train import _build, train_model

    uri, enc = encoder
    import mlflow

    mlflow.set_tracking_uri(uri)
    cfg = SegmentConfig(store=str(tiny_store), encoder_uri=enc, freeze_encoder=True, head="linear", steps=3)
    e = load_encoder(enc)
    groups, mean, std = resolve_inputs(cfg, e)
    data = load_data(cfg, groups, mean, std)
    model, enc_params = _build("vit", cfg, data, e)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_model(model, data.x_train[:8], data.y_train[:8], cfg, enc_params)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert model(data.x_test[:2]).shape == (2, len(data.classes), 32, 32)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_say_what_is_wrong(tiny_store, encoder, tmp_path):
    uri, enc = encoder
    with pytest.raises(InputError, match="no label source 'landcover'"):
        run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri, label_modality="landcover", steps=1))
    with pytest.raises(InputError, match="no label source 'dem'"):  # an input, not a label
        run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri, label_modality="dem", steps=1))
    with pytest.raises(InputError, match="label 'vegetation' is continuous: a categorical label is needed"):
        run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri, label_modality="vegetation", steps=1))
    with pytest.raises(InputError, match=r"modalities \['worldcover'\] are labels"):
        run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri, modalities=("worldcover",), steps=1))
    with pytest.raises(InputError, match="cannot load the encoder") as e:
        run_segmentation(SegmentConfig(store=str(tiny_store), tracking_uri=uri,
                                       encoder_uri="models:/sarflow-encoder-nope/1", steps=1))
    assert e.value.where == "models:/sarflow-encoder-nope/1"
    with pytest.raises(InputError, match="no chip store here"):
        run_segmentation(SegmentConfig(store=str(tmp_path / "none.zarr"), tracking_uri=uri, steps=1))
    # a store of 36 px chips cannot be cut into the encoder's 8 px patches
    from sarflow.data.catalog import load_catalog
    from sarflow.data.synth import SynthConfig, synthesize
    from sarflow.data.tile import TileOptions, tile

    cat = synthesize(tmp_path / "scene", SynthConfig(size_px=144, seed=3, chip_size=36))
    store36 = tile(load_catalog(cat), tmp_path / "c36.zarr", TileOptions(), show_progress=False)
    with pytest.raises(InputError, match="chips of 36 px cannot be cut into the 8 px patches"):
        run_segmentation(SegmentConfig(store=str(store36), tracking_uri=uri, encoder_uri=enc, steps=1))


# ---------------------------------------------------------------- CLI

def test_cli_trains_prints_the_table_and_fails_cleanly(tiny_store, encoder):
    from typer.testing import CliRunner

    from sarflow.cli.segment import segment_app

    uri, enc = encoder
    run = CliRunner().invoke(segment_app, ["train", str(tiny_store), "--tracking-uri", uri, "--steps", "3",
                                           "--no-register", "--experiment", "cli-seg"])
    assert run.exit_code == 0, run.output
    assert "U-Net (scratch)" in run.output and "mIoU" in run.output and "majority class" in run.output
    bad = CliRunner().invoke(segment_app, ["train", str(tiny_store), "--encoder", "models:/sarflow-encoder-nope/1",
                                           "--tracking-uri", uri, "--steps", "1"])
    assert bad.exit_code == 2 and "error: models:/sarflow-encoder-nope/1: cannot load the encoder" in bad.output


# ---------------------------------------------------------------- any catalog: a 0/1 water label, nodata -1

def test_a_water_label_is_segmented_with_its_declared_classes_and_colours(tmp_path):
    """No encoder: the U-Net reads the store's inputs; the label is the store's only categorical
    one (0 dry / 1 water, nodata -1); figures colour and name the declared classes."""
    import mlflow
    from matplotlib.colors import to_hex

    from sarflow.downstream.segmentation.data import load_data, resolve_inputs
    from sarflow.downstream.segmentation.figures import _code_cmap, class_label
    from test_llp_run import water_store

    _, store = water_store(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = SegmentConfig(store=str(store), tracking_uri=uri, steps=40, batch_size=8, threads=1, unet_widths=(8, 16))
    groups, mean, std = resolve_inputs(cfg)
    assert groups == [("sar", "sar", ["VV", "VH"])]
    data = load_data(cfg, groups, mean, std)
    assert data.classes == [0, 1] and data.class_names == ["dry", "water"] and data.label == "flood"
    y = data.y_train.numpy()
    assert set(np.unique(y)) == {0, 1, IGNORE}  # dry is a class; the -1 strip is ignored, never a class
    assert (y[:, :, :5] == IGNORE).sum() > 0  # the label's nodata strip
    blind = 0  # the SAR's nodata rows: a pixel without input is neither learnt nor scored
    for x, yy in ((data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test)):
        no_input = ~torch.isfinite(x).any(dim=1)
        blind += int(no_input.sum())
        assert (yy[no_input] == IGNORE).all()
    assert blind > 0
    cmap = _code_cmap(data)
    assert to_hex(cmap(2)) == "#1f5fd0"  # water's declared colour; dry gets the palette's
    assert [class_label(data, k) for k in range(2)] == ["dry", "water"]

    res = run_segmentation(cfg)
    assert res["task"] == "segmentation-flood" and res["best"] == "unet" and "vit" not in res
    assert res["unet"]["test_miou"] > res["majority_baseline"]["miou"]
    assert list(res["models"]) == ["sarflow-segmentation-flood"]
    mlflow.set_tracking_uri(uri)
    mv = mlflow.MlflowClient().get_model_version("sarflow-segmentation-flood", res["models"]["sarflow-segmentation-flood"]["version"])
    assert mv.tags["sarflow.eval_set"].endswith(":test:segmentation-flood") and mv.tags["sarflow.classes"] == "0,1"


def test_a_one_class_test_split_is_not_evaluable_and_nothing_is_registered(tmp_path):
    import mlflow

    from test_llp_run import water_store

    import pandas as pd

    _, first = water_store(tmp_path / "first")
    chips = pd.read_parquet(first / "chips.parquet")
    test = chips[chips["split"] == "test"]
    assert len(test) >= 10
    # the same scene with its test chips all dry: train and val see water, test does not
    _, store = water_store(tmp_path, dry_boxes=test[["minx", "miny", "maxx", "maxy"]].to_numpy().tolist())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(InputError, match="no task is evaluable on this store: segmentation-flood: test split shows "
                                         "fewer than two classes") as e:
        run_segmentation(SegmentConfig(store=str(store), tracking_uri=uri, steps=2))
    assert e.value.where == str(store)
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []
    assert mlflow.search_runs(search_all_experiments=True).empty

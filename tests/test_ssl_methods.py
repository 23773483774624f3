"""The self-supervised methods learn on a small CPU budget (loss against each method's trivial
reference), the collapse monitor tells a collapsed embedding from a trained one, the online kNN
probe finds texture-defined classes, CLIP trains the fused (served) embedding, and the MAE
reconstruction figure is made of the model's outputs only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from sarflow.training.data import ChipDataset, LoaderConfig, ModalitySpec
from sarflow.training.methods import DINO, MAE, MultiModalCLIP, OptimConfig, group_input
from sarflow.training.monitor import SSLMonitor, collapse_reason, embedding_stats, knn_accuracy
from sarflow.training.pretrain import PretrainConfig, resolve_groups
from sarflow.training.vit import ViTConfig

TINY = ViTConfig(size="tiny", patch=8, depth=2, dim=32, heads=2)
FINE = ViTConfig(size="tiny", patch=4, depth=2, dim=32, heads=2)  # 64 patches of the 32 px chips: 16 visible to MAE


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _groups(store, method, groups=None, modalities=None):
    return resolve_groups(PretrainConfig(store=str(store), method=method, groups=groups, modalities=modalities, vit=TINY))


def _batches(store, groups, split="train", bs=16, n=None, min_valid=0.0):
    specs = [ModalitySpec(g.modality, g.bands, g.key) for g in groups]
    ds = ChipDataset(LoaderConfig(store=str(store), modalities=specs, split=split, min_valid=min_valid, augment=None))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [ds[i] for i in idx]
    out = [torch.utils.data.default_collate(samples[k:k + bs]) for k in range(0, len(samples) - bs + 1, bs)]
    return out[:n] if n else out


def _train(module, batches, steps):
    opt = module.configure_optimizers()
    o, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    module.train()
    for step in range(steps):
        loss = module.training_step(batches[step % len(batches)], step)
        o.zero_grad()
        loss.backward()
        o.step()
        sched.step()
        if isinstance(module, DINO):
            module.on_train_batch_end()
    return module.eval()


def _embed(module, batches):
    with torch.no_grad():
        return torch.cat([module.embed_batch(b) for b in batches]).numpy()


# ---------------------------------------------------------------- the monitor itself

def test_embedding_statistics_have_their_known_values():
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((400, 16))
    s = embedding_stats(iso)
    assert 13 < s["effective_rank"] <= 16 and abs(s["median_cosine"]) < 0.05 and 0.9 < s["std"] < 1.1
    assert collapse_reason(s) is None
    const = np.tile(rng.standard_normal(16), (50, 1))
    s = embedding_stats(const)
    assert s["effective_rank"] == 0 and s["median_cosine"] == pytest.approx(1.0) and s["std"] < 1e-6
    assert "median pairwise cosine" in collapse_reason(s)
    line = np.outer(rng.standard_normal(50), rng.standard_normal(16)) + 1e-9 * rng.standard_normal((50, 16))
    s = embedding_stats(line)  # every chip on one line through 0: cosine +-1, rank 1
    assert s["effective_rank"] < 1.1 and collapse_reason(s) is not None
    with pytest.raises(ValueError, match="two or more"):
        embedding_stats(iso[:1])


def test_knn_accuracy_on_separable_and_on_random_labels():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 8)) * 4
    y = rng.integers(0, 3, 300)
    z = centres[y] + rng.standard_normal((300, 8))
    acc, chance = knn_accuracy(z[:200], y[:200], z[200:], y[200:])
    assert acc > 0.95 and 0.2 < chance < 0.5
    acc, _ = knn_accuracy(z[:200], rng.integers(0, 3, 200), z[200:], y[200:])
    assert acc < 0.55  # labels unrelated to the embedding: about a third


# ---------------------------------------------------------------- MAE

@pytest.mark.slow  # 150/100/80 CPU steps: 20-40 s
def test_mae_falls_well_below_the_trivial_loss(tiny_store):
    torch.manual_seed(0)
    groups = _groups(tiny_store, "mae")
    batches = _batches(tiny_store, groups)
    mae = MAE(groups, FINE, OptimConfig(lr=3e-3, warmup_steps=5, max_steps=150), decoder_dim=32, decoder_depth=1)

    def losses():
        torch.manual_seed(1)  # the same masks
        out = [mae.forward_loss(*group_input(b, mae.groups), trivial=True) for b in batches]
        return float(np.mean([o[0].item() for o in out])), float(np.mean([o[3].item() for o in out]))

    _, trivial = losses()
    n = FINE.patch ** 2 * mae.chans  # values per patch: predicting 0 for a normalised patch costs (n - 1) / n
    assert trivial == pytest.approx((n - 1) / n, abs=0.02)
    _train(mae, batches, 150)
    loss, _ = losses()
    assert loss < 0.7 * trivial, (loss, trivial)


def test_mae_figure_is_the_models_output_and_changes_with_its_weights(tiny_store, tmp_path):
    from sarflow.training.pretrain import mae_figure

    groups = _groups(tiny_store, "mae")
    b = _batches(tiny_store, groups, n=1, bs=4)[0]
    x, valid = group_input(b, groups)
    mae = MAE(groups, TINY, OptimConfig(), decoder_dim=32, decoder_depth=1).eval()

    def shown():
        torch.manual_seed(3)
        return mae.reconstruct(x, valid)

    first = shown()
    assert np.array_equal(first["input"], x[:, 0].numpy())
    with torch.no_grad():
        for p in mae.decoder_pred.parameters():
            p.mul_(0.5)
    second = shown()
    assert np.array_equal(first["target"], second["target"], equal_nan=True)  # same masks and chips
    assert not np.allclose(first["prediction"], second["prediction"])
    with torch.no_grad():  # a decoder that outputs 0: the figure shows 0, nothing of the target
        for p in mae.decoder_pred.parameters():
            p.zero_()
    assert np.abs(shown()["prediction"]).max() == 0
    paths = mae_figure(mae, x, valid, tmp_path)
    assert paths[0].stat().st_size > 0
    saved = np.load(paths[1])
    assert set(saved.files) == {"input", "masked", "target", "prediction", "hidden"}
    assert np.abs(saved["prediction"]).max() == 0


# ---------------------------------------------------------------- DINO and the collapse monitor

def _monitor(store, groups, min_valid=0.0):
    return SSLMonitor(str(store), [ModalitySpec(g.modality, g.bands, g.key) for g in groups], min_valid, every=1,
                      max_chips=64)


@pytest.mark.slow  # 150/100/80 CPU steps: 20-40 s
def test_dino_learns_below_log_k_and_is_not_flagged_and_a_collapsed_encoder_is(tiny_store):
    torch.manual_seed(0)
    groups = _groups(tiny_store, "dino", modalities=["s1grd"])
    batches = _batches(tiny_store, groups)
    dino = DINO(groups, TINY, OptimConfig(lr=2e-3, warmup_steps=5, max_steps=100), out_dim=64, local_crops=2)
    assert dino.teacher_temperature(0) == pytest.approx(0.04) and dino.teacher_temperature(100) == pytest.approx(0.07)
    _train(dino, batches, 100)
    torch.manual_seed(5)
    with torch.no_grad():
        loss = float(np.mean([dino.loss(group_input(b, groups)[0]).item() for b in batches]))
    # log(out_dim): a student that outputs the uniform distribution; the floor is the teacher's entropy, which
    # centering keeps high early on, so a short run gains a few percent (about 0.92 log K after 100 steps)
    assert loss < 0.95 * math.log(64), loss
    monitor = _monitor(tiny_store, groups)
    trained = monitor.check(dino, 100)
    assert not trained["collapse"], trained
    with torch.no_grad():  # a collapsed encoder: its last norm outputs its bias whatever the chip
        dino.teacher.norm.weight.zero_()
    collapsed = monitor.check(dino, 101)
    assert collapsed["collapse"] and "cosine" in collapsed["collapse_reason"], collapsed


# ---------------------------------------------------------------- CLIP

@pytest.mark.slow  # 150/100/80 CPU steps: 20-40 s
def test_clip_trains_the_fused_embedding(tiny_store):
    torch.manual_seed(0)
    groups = _groups(tiny_store, "clip", modalities=["s1grd", "s1coh", "s2rgb"])
    batches = _batches(tiny_store, groups, min_valid=-1.0)
    clip = MultiModalCLIP(groups, TINY, OptimConfig(lr=2e-3, warmup_steps=5, max_steps=80), embed_dim=32,
                          modality_dropout=0.3, channel_dropout=0.1)
    _train(clip, batches, 80)
    clip.train()
    torch.manual_seed(2)
    with torch.no_grad():
        loss = float(np.mean([clip.loss(b).item() for b in batches]))
    assert loss < 0.65 * math.log(16), loss  # log(batch): embeddings that tell no chip apart
    clip.eval()
    held = _batches(tiny_store, groups, split=None, min_valid=-1.0, bs=32, n=1)[0]
    enc = clip.export_encoder()
    names = [n for n, _ in enc.groups]
    with torch.no_grad():
        parts = {n: group_input(held, [g for g in groups if g.name == n])[0] for n in names}
        per = enc.embed_groups(parts)
        has = {n: held[f"{[g for g in groups if g.name == n][0].input_key}_present"].bool() for n in names}
        full = enc.fuse(per, has)
        for drop in names:
            others = {n: has[n] & (n != drop) for n in names}
            keep = torch.stack(list(others.values()), dim=1).any(dim=1) & has[drop]
            part = enc.fuse(per, others)[keep]
            sim = part @ full[keep].T
            own = sim.diagonal().clone()
            sim.fill_diagonal_(-2)
            closer = (own > sim.max(dim=1).values).float().mean().item()
            assert closer > 0.8, (drop, closer)  # the same chip's full fused embedding is the nearest


# ---------------------------------------------------------------- kNN probe on texture classes

@pytest.fixture(scope="module")
def texture_store(tiny_scene, tmp_path_factory):
    """Chips of two declared classes with the same mean and variance of backscatter, told apart
    only by texture: smooth (a Gaussian-filtered field) vs speckle-like (white noise)."""
    import rasterio
    from scipy import ndimage

    from helpers import write_catalog
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    out = tmp_path_factory.mktemp("texture")
    with rasterio.open(tiny_scene.parent / "worldcover.tif") as ref:
        profile, (h, w) = ref.profile, ref.shape
    chip = yaml.safe_load(tiny_scene.read_text())["grid"]["chip_size"]
    rng = np.random.default_rng(11)
    iy, ix = np.indices((math.ceil(h / chip), math.ceil(w / chip)))
    classes = (iy + ix) % 2  # a checkerboard of chips: both classes in every split block
    label = np.kron(classes, np.ones((chip, chip), int))[:h, :w]
    smooth = ndimage.gaussian_filter(rng.standard_normal((h, w)), 3.0)
    smooth /= smooth.std()
    value = np.where(label == 0, smooth, rng.standard_normal((h, w))) * 2.0 - 10.0
    p = {**profile, "count": 1}
    with rasterio.open(out / "tex.tif", "w", **{**p, "dtype": "float32", "nodata": None}) as ds:
        ds.write(value.astype(np.float32), 1)
    with rasterio.open(out / "lc.tif", "w", **{**p, "dtype": "uint8", "nodata": 0}) as ds:
        ds.write(np.where(label == 0, 10, 30).astype(np.uint8), 1)
    grid = yaml.safe_load(tiny_scene.read_text())["grid"]
    cat = write_catalog(out / "c.yaml", grid, [
        {"name": "tex", "uris": [str(out / "tex.tif")], "bands": ["VV"], "units": "dB", "kind": "continuous"},
        {"name": "lc", "uris": [str(out / "lc.tif")], "bands": ["class"], "units": "class", "kind": "categorical",
         "nodata": 0, "legend": "worldcover"}])
    return tile(load_catalog(cat), out / "chips.zarr", TileOptions(shard_chips=16), show_progress=False)


def test_online_knn_probe_beats_chance_on_texture_classes(texture_store):
    torch.manual_seed(0)
    groups = _groups(texture_store, "mae")
    mae = MAE(groups, TINY, OptimConfig(lr=2e-3, warmup_steps=5, max_steps=30), decoder_dim=32, decoder_depth=1)
    _train(mae, _batches(texture_store, groups), 30)
    r = _monitor(texture_store, groups).check(mae, 30)
    knn = r["knn"]["lc"]
    assert knn["val_chips"] >= 8 and knn["chance"] <= 0.75 and knn["accuracy"] >= knn["chance"] + 0.2, r


def test_monitor_classes_read_only_the_chosen_rows_and_match_the_stores_label_fractions(texture_store):
    """chip_classes(store, rows) = the majority class of each row's label fractions (the store-wide
    label_features), reading only those rows; a chip without a labelled pixel is -1."""
    from sarflow.data.chip_labels import class_column, label_features
    from sarflow.training.monitor import chip_classes

    cols = label_features(str(texture_store))
    frac = np.stack([cols[class_column("lc", c)] for c in (10, 30)], axis=1)
    rows = np.array([0, 3, 5, 8, 13])
    got = chip_classes(str(texture_store), rows)["lc"]
    expected = np.where(np.nan_to_num(frac[rows]).sum(axis=1) > 0, np.array([10, 30])[np.nan_to_num(frac[rows], nan=-1).argmax(axis=1)], -1)
    assert got.tolist() == expected.tolist() and set(got.tolist()) == {10, 30}
    assert chip_classes(str(texture_store), np.array([], np.int64))["lc"].tolist() == []

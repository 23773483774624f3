"""The training plane on CPU: loader exactness, the three methods, export, MLflow lineage."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import zarr

from sarflow.errors import InputError
from sarflow.features.embed import encoder_arrays, encoder_chips
from sarflow.training.data import Augment, ChipDataset, LoaderConfig, ModalitySpec, ShardChipDataset
from sarflow.training.methods import DINO, MAE, Group, MultiModalCLIP, OptimConfig
from sarflow.training.pretrain import PretrainConfig, pretrain, resolve_groups
from sarflow.training.vit import ViTConfig

TINY = ViTConfig(size="tiny", patch=8, depth=2, dim=32, heads=2)


def _cfg(store, mods, **kw):
    return LoaderConfig(store=str(store), modalities=[ModalitySpec(*m) if isinstance(m, tuple) else ModalitySpec(m)
                                                      for m in mods], **kw)


# ---------------------------------------------------------------- loader

def test_loader_returns_the_store_pixels_normalised_as_stated(tiny_store):
    ds = ChipDataset(_cfg(tiny_store, [("s1grd", ["VH"]), "worldcover"], split=None, augment=None))
    g = zarr.open_group(str(tiny_store), mode="r")
    st = g["s1grd"].attrs["stats"]["bands"]["VH"]
    assert len(ds) == g.attrs["chips"]
    for i in (0, 7, len(ds) - 1):
        s = ds[i]
        raw = g["s1grd"][s["index"], 1].astype(np.float64)
        expect = np.nan_to_num((raw - st["mean"]) / st["std"], nan=0.0)
        assert s["s1grd"].shape == (1,) + raw.shape
        np.testing.assert_allclose(s["s1grd"][0].numpy(), expect, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s["worldcover"].numpy(), g["worldcover"][s["index"], 0].astype(np.int64))


def test_shard_iterable_reads_each_selected_chip_once_across_workers(tiny_store):
    import geopandas as gpd
    from torch.utils.data import DataLoader

    cfg = _cfg(tiny_store, ["s1grd"], split="train", augment=None, shuffle_buffer=8)
    loader = DataLoader(ShardChipDataset(cfg), batch_size=4, num_workers=2)
    seen = torch.cat([b["index"] for b in loader]).tolist()
    t = gpd.read_parquet(tiny_store / "chips.parquet")
    expect = sorted(t.loc[(t.split == "train") & (t.valid_s1grd > 0), "index"].tolist())
    assert sorted(seen) == expect and seen != expect  # all of them, once, shuffled
    # two DDP ranks split the shards without overlap, and yield as many chips each (the fewer of the two
    # shares: ranks step in lockstep, a rank with more batches would wait forever on the other)
    a = [s["index"] for s in ShardChipDataset(cfg, rank=0, world_size=2)]
    b = [s["index"] for s in ShardChipDataset(cfg, rank=1, world_size=2)]
    assert not set(a) & set(b) and set(a + b) <= set(expect) and len(a) == len(b) > 0


def test_augmentation_is_identical_across_modalities(tiny_scene, tmp_path):
    import yaml
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    data = yaml.safe_load(tiny_scene.read_text())
    s1 = next(s for s in data["sources"] if s["name"] == "s1grd")
    s1["uris"] = [str(tiny_scene.parent / u) for u in s1["uris"]]
    twin = dict(s1, name="s1twin")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"grid": data["grid"], "sources": [s1, twin]}))
    store = tile(load_catalog(tmp_path / "c.yaml"), tmp_path / "twin.zarr", TileOptions(), show_progress=False)
    ds = ChipDataset(_cfg(store, ["s1grd", "s1twin"], split=None, augment=Augment(resized_crop=(0.3, 0.6)),
                          output_size=48))
    flipped_somewhere = False
    for i in range(12):
        s = ds[i]
        assert s["s1grd"].shape == (2, 48, 48)
        torch.testing.assert_close(s["s1grd"], s["s1twin"])
        plain = ChipDataset(_cfg(store, ["s1grd"], split=None, augment=None))[i]["s1grd"]
        flipped_somewhere |= not torch.allclose(torch.nn.functional.interpolate(plain[None], size=48)[0], s["s1grd"])
    assert flipped_somewhere


def test_missing_modality_is_an_explicit_mask_never_another_sample(tiny_scene, tmp_path):
    import rasterio
    import yaml
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    scene = tiny_scene.parent
    with rasterio.open(scene / "s2rgb.tif") as src:  # an optical scene covering only the western third
        profile, data = src.profile, src.read()
    data[:, :, data.shape[2] // 3:] = np.nan
    with rasterio.open(tmp_path / "west.tif", "w", **profile) as dst:
        dst.write(data)
    cat = yaml.safe_load(tiny_scene.read_text())
    s1 = next(s for s in cat["sources"] if s["name"] == "s1grd")
    s1["uris"] = [str(scene / u) for u in s1["uris"]]
    west = {"name": "s2west", "uris": [str(tmp_path / "west.tif")], "bands": ["B04", "B03", "B02"],
            "units": "reflectance", "kind": "continuous", "required": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"grid": cat["grid"], "sources": [s1, west]}))
    store = tile(load_catalog(tmp_path / "c.yaml"), tmp_path / "w.zarr", TileOptions(), show_progress=False)
    ds = ChipDataset(_cfg(store, ["s1grd", "s2west"], split=None, augment=None))
    flags = [bool(ds[i]["s2west_present"]) for i in range(len(ds))]
    assert any(flags) and not all(flags)
    absent = next(i for i, f in enumerate(flags) if not f)
    s = ds[absent]
    assert torch.count_nonzero(s["s2west"]) == 0 and torch.count_nonzero(s["s1grd"]) > 0


# ---------------------------------------------------------------- methods learn

def _batches(store, mods, n=6, bs=8, seed=0):
    ds = ChipDataset(_cfg(store, mods, split=None, augment=None))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: n * bs].tolist()
    samples = [ds[i] for i in idx]
    return [torch.utils.data.default_collate(samples[k * bs:(k + 1) * bs]) for k in range(n)]


def _train(module, batches, steps):
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    for step in range(steps):
        loss = module.training_step(batches[step % len(batches)], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(module, "on_train_batch_end") and isinstance(module, DINO):
            module.on_train_batch_end()
    return module


def _groups(store, spec):
    return resolve_groups(PretrainConfig(store=str(store), method="clip" if len(spec) > 1 else "mae",
                                         groups=spec, vit=TINY))


def test_mae_loss_goes_down(tiny_store):
    torch.manual_seed(0)
    batches = _batches(tiny_store, ["s1grd"])
    mae = MAE(_groups(tiny_store, [("s1", "s1grd", None)]), TINY, OptimConfig(lr=2e-3, warmup_steps=1, max_steps=60),
              decoder_dim=32, decoder_depth=1)
    eval_loss = lambda: np.mean([mae.forward_loss(b["s1grd"])[0].item() for b in batches])  # noqa: E731
    torch.manual_seed(1)
    before = eval_loss()
    _train(mae, batches, 60)
    torch.manual_seed(1)  # the same masks
    after = eval_loss()
    assert after < 0.85 * before, (before, after)


def test_dino_student_learns_to_match_the_teacher(tiny_store):
    torch.manual_seed(0)
    batches = _batches(tiny_store, ["s1grd"])
    groups = _groups(tiny_store, [("s1", "s1grd", None)])
    dino = DINO(groups, TINY, OptimConfig(lr=1e-3, warmup_steps=1, max_steps=40), out_dim=64, local_crops=2)
    fresh_student = [p.detach().clone() for p in list(dino.student.parameters()) + list(dino.student_head.parameters())]
    _train(dino, batches, 40)
    dino.eval()

    def loss_with(student_params):
        saved = [p.detach().clone() for p in list(dino.student.parameters()) + list(dino.student_head.parameters())]
        with torch.no_grad():
            for p, v in zip(list(dino.student.parameters()) + list(dino.student_head.parameters()), student_params):
                p.copy_(v)
            torch.manual_seed(5)  # the same crops
            out = np.mean([dino.loss(b["s1grd"]).item() for b in batches])
            for p, v in zip(list(dino.student.parameters()) + list(dino.student_head.parameters()), saved):
                p.copy_(v)
        return out

    trained = loss_with([p.detach().clone() for p in list(dino.student.parameters()) + list(dino.student_head.parameters())])
    untrained = loss_with(fresh_student)
    assert trained < untrained - 0.05, (trained, untrained)
    maps = dino.attention_maps(batches[0]["s1grd"][:2])
    assert maps.shape == (2, 2, 4, 4)  # (chips, heads, 32/8, 32/8)
    mass = maps.sum(axis=(2, 3))  # the CLS token's attention on the patches (the rest is on itself)
    assert (maps >= 0).all() and (mass > 0).all() and (mass <= 1 + 1e-5).all()


def test_clip_loss_goes_down_and_embeds_with_any_modality_or_channel_missing(tiny_store):
    torch.manual_seed(0)
    spec = [("s1", "s1grd", None), ("coh", "s1coh", None), ("s2", "s2rgb", None)]
    batches = _batches(tiny_store, ["s1grd", "s1coh", "s2rgb"])
    clip = MultiModalCLIP(_groups(tiny_store, spec), TINY, OptimConfig(lr=2e-3, warmup_steps=1, max_steps=60),
                          embed_dim=32, modality_dropout=0.0, channel_dropout=0.0)
    clip.eval()
    before = np.mean([clip.loss(b).item() for b in batches])
    clip.modality_dropout, clip.channel_dropout = 0.2, 0.1
    _train(clip, batches, 60)
    clip.eval()
    after = np.mean([clip.loss(b).item() for b in batches])
    assert after < 0.8 * before, (before, after)

    enc = clip.export_encoder()
    g = zarr.open_group(str(tiny_store), mode="r")
    x = torch.from_numpy(np.concatenate([g[m][0:4] for m in ("s1grd", "s1coh", "s2rgb")], axis=1).astype(np.float32))
    full = enc(x)
    assert full.shape == (4, 32) and torch.allclose(full.norm(dim=1), torch.ones(4), atol=1e-5)
    spans = {"s1": slice(0, 2), "coh": slice(2, 6), "s2": slice(6, 9)}
    for name, span in spans.items():
        y = x.clone()
        y[:, span] = float("nan")
        e = enc(y)
        assert torch.isfinite(e).all(), name
        # a missing modality simply drops out of the fusion: same as fusing the others
        parts, present = enc.split(x)
        per = enc.embed_groups(parts)
        expect = enc.fuse({n: per[n] for n in spans}, {n: present[n] & (n != name) for n in spans})
        torch.testing.assert_close(e, expect, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(e, full)
    y = x.clone()
    y[:, 1] = float("nan")  # VH missing
    y[:, 3:6] = float("nan")  # three of four coherence baselines missing
    assert torch.isfinite(enc(y)).all()


# ---------------------------------------------------------------- tracking and registry

@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "dino", "clip"])
def test_pretrain_tracks_lineage_registers_and_the_model_loads_back(method, tiny_store, tmp_path):
    import mlflow

    from sarflow.data.versioning import version_store

    store = tmp_path / "chips.zarr"
    shutil.copytree(tiny_store, store)
    version = version_store(store, repo=tmp_path, push=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = {"mae": {"decoder_dim": 32, "decoder_depth": 1}, "dino": {"out_dim": 64, "local_crops": 2},
              "clip": {"embed_dim": 32}}[method]
    r = pretrain(PretrainConfig(store=str(store), method=method, vit=TINY, batch_size=8,
                                optim=OptimConfig(lr=1e-3, warmup_steps=1, max_steps=4), tracking_uri=uri,
                                method_kwargs=kwargs))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    run = client.get_run(r["run_id"])
    assert run.data.tags["sarflow.dataset_dvc_md5"] == version["dvc_md5"]
    assert run.data.tags["sarflow.catalog_hash"] == zarr.open_group(str(store), mode="r").attrs["catalog_hash"]
    assert run.data.tags["sarflow.code_version"]
    assert "perf/chips_per_s" in run.data.metrics and math.isfinite(run.data.metrics["train/final_loss"])
    assert {"train/lr", "train/trivial_loss", "val/effective_rank", "val/std", "val/median_cosine",
            "val/collapse"} <= set(run.data.metrics)
    assert math.isfinite(r["trivial_loss"]) and r["trivial_loss"] > 0 and isinstance(r["collapse"], bool)
    assert run.data.tags["sarflow.collapse"] == (r["collapse_reason"] or "no")
    checks = client.get_metric_history(r["run_id"], "val/median_cosine")
    assert [c.step for c in checks] == [0, 1, 2, 3, 4]  # before training, every max_steps // 4 and at the end
    # the synthetic store's one categorical label, probed on its val chips
    assert "val/knn_worldcover" in run.data.metrics and r["knn"]["worldcover"]["val_chips"] > 0
    artifacts = {a.path for a in client.list_artifacts(r["run_id"], "figures")}
    assert "figures/loss_curve.png" in artifacts
    if method == "mae":
        assert "figures/mae_reconstructions.png" in artifacts
    if method == "dino":
        assert {"figures/dino_attention.png", "figures/dino_attention.npy"} <= artifacts
    assert client.list_artifacts(r["run_id"], "checkpoints")
    name = f"sarflow-encoder-{method}"
    mv = client.get_model_version(name, r["version"])
    assert mv.tags["sarflow.dataset_dvc_md5"] == version["dvc_md5"]
    model = mlflow.pytorch.load_model(f"models:/{name}/{r['version']}")
    from sarflow.training.encoder import ChipEncoder

    assert isinstance(model, ChipEncoder)  # the encoder itself, not an opaque exported graph
    g = zarr.open_group(str(store), mode="r")
    inputs = list(g.attrs["inputs"])  # every input source of the store, no label
    assert model.modalities == inputs and not set(model.modalities) & set(g.attrs["labels"])
    assert model.in_chans == r["in_chans"] == sum(len(g[m].attrs["bands"]) for m in inputs)
    if method == "clip":  # one encoder per input source
        assert [name for name, _ in model.groups] == inputs
    else:  # one encoder on every input band
        assert len(model.groups) == 1 and model.backbones["inputs"].patch_embed.in_channels == model.in_chans
    x = torch.from_numpy(encoder_chips(encoder_arrays(g, model, str(store)), slice(0, 3)))
    with torch.no_grad():
        e = model(x)
    assert e.shape == (3, r["embedding_dim"]) and torch.isfinite(e).all()


# ---------------------------------------------------------------- bad input

def test_bad_pretrain_inputs_are_clear_errors(tiny_store):
    with pytest.raises(InputError, match=r"modalities \['sentinel3'\] are not in the store: choose from the store's inputs"):
        resolve_groups(PretrainConfig(store=str(tiny_store), groups=[("x", "sentinel3", None)], vit=TINY))
    with pytest.raises(InputError, match=r"no band\(s\) \['HH'\]"):
        resolve_groups(PretrainConfig(store=str(tiny_store), groups=[("x", "s1grd", ["HH"])], vit=TINY))
    with pytest.raises(InputError, match="unknown method"):
        resolve_groups(PretrainConfig(store=str(tiny_store), method="simclr", vit=TINY))
    with pytest.raises(InputError, match="cannot be cut into 64 px patches"):
        resolve_groups(PretrainConfig(store=str(tiny_store), vit=ViTConfig(patch=64)))
    with pytest.raises(InputError, match=r"modalities \['worldcover'\] are labels"):  # a label is never an input
        resolve_groups(PretrainConfig(store=str(tiny_store), groups=[("x", "worldcover", None)], vit=TINY))
    with pytest.raises(InputError, match=r"mae trains one encoder on one input group, pretrain.groups declares \['a', 'b'\]"):
        resolve_groups(PretrainConfig(store=str(tiny_store), groups=[("a", "s1grd", None), ("b", "s2rgb", None)], vit=TINY))
    with pytest.raises(InputError, match=r"modalities \['s2rgb'\] are in no group of pretrain.groups"):
        resolve_groups(PretrainConfig(store=str(tiny_store), method="clip", modalities=["s1grd", "s2rgb"], vit=TINY,
                                      groups=[("a", "s1grd", ["VV"]), ("b", "s1grd", ["VH"])]))


@pytest.mark.gpu
def test_gpu_bf16_training_step():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    groups = [Group("s1", "s1grd", ["VV", "VH"], [-12.6, -20.3], [5.3, 5.9])]
    mae = MAE(groups, ViTConfig(size="tiny", patch=16, in_chans=2), OptimConfig()).cuda()
    x = torch.randn(8, 2, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = mae.forward_loss(x)
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- never a silent wrong result

def _runs(uri: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("sarflow-pretrain")
    return [] if exp is None else mlflow.search_runs([exp.experiment_id], output_format="list")


def test_mae_on_a_chip_of_one_patch_is_refused_before_any_run(tiny_store, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one_patch = ViTConfig(size="tiny", patch=32, depth=1, dim=32, heads=2)  # the tiny store's chips are 32 px
    with pytest.raises(InputError, match=r"has 1 patch\(es\) and masks none of them"):
        pretrain(PretrainConfig(store=str(tiny_store), method="mae", vit=one_patch, batch_size=4, tracking_uri=uri,
                                optim=OptimConfig(max_steps=2)))
    assert _runs(uri) == []
    # DINO has no masking: one patch is a legitimate (if coarse) token grid
    assert {b.name for b in resolve_groups(PretrainConfig(store=str(tiny_store), method="dino", vit=one_patch))} == {"inputs"}


def test_a_batch_larger_than_the_train_split_is_refused_with_the_fix_named(tiny_store, tmp_path):
    n_train = len(ShardChipDataset(_cfg(tiny_store, ["s1grd"], split="train")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(InputError, match=rf"batch_size {n_train + 1} is larger than the train split \({n_train} chips\): "
                                         rf"pass --batch-size {n_train} or less"):
        pretrain(PretrainConfig(store=str(tiny_store), vit=TINY, batch_size=n_train + 1, tracking_uri=uri,
                                optim=OptimConfig(max_steps=2)))
    assert _runs(uri) == []


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_registers_nothing(tiny_store, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(InputError, match="loss is (nan|inf).*nothing registered"):  # an infinite step size diverges
        pretrain(PretrainConfig(store=str(tiny_store), method="mae", vit=TINY, batch_size=4, tracking_uri=uri,
                                optim=OptimConfig(lr=float("inf"), warmup_steps=0, max_steps=6),
                                method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
    (run,) = _runs(uri)
    assert run.info.status == "FAILED" and "train/final_loss" not in run.data.metrics
    assert mlflow.MlflowClient().search_registered_models() == []


# ---------------------------------------------------------------- inputs come from the store

def _store_of(tiny_scene, out, names: list[str], **extra):
    """A store of some of the tiny scene's sources (uris made absolute)."""
    import yaml
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    data = yaml.safe_load(tiny_scene.read_text())
    sources = []
    for s in data["sources"]:
        if s["name"] in names:
            s = {**s, "uris": [str(tiny_scene.parent / u) for u in s["uris"]], **extra.get(s["name"], {})}
            sources.append(s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "catalog.yaml").write_text(yaml.safe_dump({"grid": data["grid"], "sources": sources}))
    return tile(load_catalog(out / "catalog.yaml"), out / "chips.zarr", TileOptions(shard_chips=16), show_progress=False)


@pytest.fixture(scope="module")
def insar_store(tiny_scene, tmp_path_factory):
    """Only interferometric inputs: coherence (0..1) and unwrapped phase (radians), with a label."""
    return _store_of(tiny_scene, tmp_path_factory.mktemp("insar"), ["s1coh", "s1ifg", "worldcover"],
                     s1coh={"required": True}, s1ifg={"required": True})


def test_default_groups_come_from_the_store(tiny_store):
    g = zarr.open_group(str(tiny_store), mode="r")
    inputs = list(g.attrs["inputs"])
    assert "worldcover" not in inputs and "s1coh" in inputs and "s2rgb" in inputs
    for method in ("mae", "dino"):  # one group: every input source, every band
        groups = resolve_groups(PretrainConfig(store=str(tiny_store), method=method, vit=TINY))
        assert {b.name for b in groups} == {"inputs"} and [b.modality for b in groups] == inputs
        assert [b.bands for b in groups] == [list(g[m].attrs["bands"]) for m in inputs]
    clip = resolve_groups(PretrainConfig(store=str(tiny_store), method="clip", vit=TINY))
    assert [(b.name, b.modality) for b in clip] == [(m, m) for m in inputs]  # one group per source
    chosen = resolve_groups(PretrainConfig(store=str(tiny_store), modalities=["s2rgb", "s1grd"], vit=TINY))
    assert [b.modality for b in chosen] == ["s2rgb", "s1grd"]
    # declared groups: several sources in one group, and one source's bands split over two groups
    declared = resolve_groups(PretrainConfig(store=str(tiny_store), method="clip", vit=TINY, groups=[
        ("sar", "s1grd", None), ("opt", "s2rgb", None), ("sar", "s1coh", None)]))
    assert [(b.name, b.modality) for b in declared] == [("sar", "s1grd"), ("sar", "s1coh"), ("opt", "s2rgb")]
    split = resolve_groups(PretrainConfig(store=str(tiny_store), method="clip", vit=TINY, groups=[
        ("vv", "s1grd", ["VV"]), ("vh", "s1grd", ["VH"])]))
    batches = [torch.utils.data.default_collate([s for s, _ in zip(ChipDataset(LoaderConfig(
        store=str(tiny_store), modalities=[ModalitySpec(b.modality, b.bands, b.key) for b in split], split=None,
        augment=None)), range(8))])]
    clip = MultiModalCLIP(split, TINY, OptimConfig(), embed_dim=16)
    assert torch.isfinite(clip.loss(batches[0]))
    assert [s[1:] for s in clip.export_encoder().sources] == [("s1grd", ["VV"]), ("s1grd", ["VH"])]


def test_a_store_of_coherence_and_phase_only_pretrains_mae(insar_store, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    g = zarr.open_group(str(insar_store), mode="r")
    assert list(g.attrs["inputs"]) == ["s1coh", "s1ifg"]
    assert {g[m].attrs["units"] for m in g.attrs["inputs"]} == {"coherence", "radians"}
    r = pretrain(PretrainConfig(store=str(insar_store), method="mae", vit=TINY, batch_size=8, tracking_uri=uri,
                                optim=OptimConfig(lr=1e-3, warmup_steps=1, max_steps=2),
                                method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
    assert len(r["losses"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["losses"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(r["model_uri"])
    assert model.in_chans == 5 == sum(len(g[m].attrs["bands"]) for m in ("s1coh", "s1ifg"))  # 4 baselines + phase
    assert model.backbones["inputs"].patch_embed.in_channels == 5
    assert model.sources == [("inputs", "s1coh", ["coh12", "coh24", "coh36", "coh48"]), ("inputs", "s1ifg", ["phase_12d"])]
    tags = mlflow.MlflowClient().get_model_version("sarflow-encoder-mae", r["version"]).tags
    assert tags["sarflow.inputs"] == "s1coh,s1ifg"


def _tiny_params(tmp_path):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": {
        "vit": {"size": "tiny", "patch": 8, "depth": 1, "dim": 32, "heads": 2},
        "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 2},
        "methods": {"mae": {"decoder_dim": 32, "decoder_depth": 1}}}}))
    return path


def test_pretrain_modalities_flag_chooses_inputs_and_refuses_a_label(tiny_store, tmp_path):
    import json

    import mlflow
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = _tiny_params(tmp_path)
    args = ["pretrain", str(tiny_store), "--params", str(params), "--batch-size", "8", "--tracking-uri", uri]
    bad = CliRunner().invoke(app, args + ["--modalities", "s1grd,worldcover"])
    assert bad.exit_code != 0
    assert "modalities ['worldcover'] are labels: choose from the store's inputs" in bad.output
    assert _runs(uri) == []
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []
    ok = CliRunner().invoke(app, args + ["--modalities", "s2rgb,s1grd"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert out["in_chans"] == 5 and [s[1] for s in out["sources"]] == ["s2rgb", "s1grd"]
    assert out["channels"][:3] == ["inputs:s2rgb:B04", "inputs:s2rgb:B03", "inputs:s2rgb:B02"]


def test_clip_on_a_store_with_one_input_source_is_refused_and_registers_nothing(tiny_scene, tiny_store, tmp_path):
    import mlflow

    store = _store_of(tiny_scene, tmp_path / "one", ["s1grd", "worldcover"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(InputError, match=r"CLIP contrasts two or more input sources and the store has one: 's1grd' "
                                         r"\(its only input source\); add another input source to the catalog.*"
                                         r"declare pretrain.groups .*or use --method mae or dino"):
        pretrain(PretrainConfig(store=str(store), method="clip", vit=TINY, batch_size=4, tracking_uri=uri,
                                optim=OptimConfig(max_steps=2)))
    assert _runs(uri) == []
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []
    # the same through --modalities on a store with several inputs names the choice
    with pytest.raises(InputError, match=r"has one: 's1grd' \(as chosen by --modalities\)"):
        resolve_groups(PretrainConfig(store=str(tiny_store), method="clip", modalities=["s1grd"], vit=TINY))

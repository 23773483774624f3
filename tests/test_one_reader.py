"""One reader, one nodata rule (issue 12 item 3): training and embedding see the chips that
`chipstore.read_masked` gives, masked where the store holds nodata, integer arrays included
(a uint16 band with nodata 0 never reaches the encoder as reflectance 0); the MAE loss ignores
masked pixels."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
import zarr
from rasterio.transform import from_origin

from helpers import write_catalog
from sarflow.data.catalog import load_catalog
from sarflow.data.chipstore import read_masked
from sarflow.data.tile import TileOptions, tile
from sarflow.features.embed import _chip_batches, encoder_arrays
from sarflow.training.data import ShardChipDataset
from sarflow.training.methods import MAE, Group, OptimConfig, group_input
from sarflow.training.pretrain import PretrainConfig, make_datamodule, resolve_groups
from sarflow.training.vit import ViTConfig

CRS = "EPSG:32630"
X0, Y0 = 1562 * 320.0, 13125 * 320.0  # on the 10 m x 16 px chip grid
SIZE = 128
TINY = ViTConfig(size="tiny", patch=8, depth=1, dim=32, heads=2)


def _write(path, data: np.ndarray, dtype: str, nodata) -> str:
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(data), dtype=dtype, crs=CRS,
                       transform=from_origin(X0, Y0, 10, 10), nodata=nodata) as ds:
        ds.write(data.astype(dtype))
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A uint16 optical source (nodata 0, holes of 0 scattered and in blocks), a float coherence
    source (NaN holes) and a categorical label, tiled onto 16 px chips."""
    tmp = tmp_path_factory.mktemp("one_reader")
    rng = np.random.default_rng(0)
    refl = rng.integers(200, 4000, (2, SIZE, SIZE)).astype(np.uint16)
    refl[:, rng.random((SIZE, SIZE)) < 0.05] = 0  # scattered nodata
    refl[0, 20:40, 30:60] = 0  # a hole in one band only
    refl[:, 70:90, 10:25] = 0  # a hole in both
    coh = rng.uniform(0, 1, (1, SIZE, SIZE)).astype(np.float32)
    coh[0, rng.random((SIZE, SIZE)) < 0.05] = np.nan
    coh[0, 100:120, 100:128] = np.nan
    lc = rng.integers(1, 3, (1, SIZE, SIZE)).astype(np.uint8)
    sources = [
        {"name": "opt", "uris": [_write(tmp / "opt.tif", refl, "uint16", 0)], "bands": ["B04", "B08"],
         "units": "reflectance", "kind": "continuous", "nodata": 0, "resampling": "nearest"},
        {"name": "coh", "uris": [_write(tmp / "coh.tif", coh, "float32", float("nan"))], "bands": ["coh12"],
         "units": "coherence", "kind": "continuous", "resampling": "nearest"},
        {"name": "lc", "uris": [_write(tmp / "lc.tif", lc, "uint8", 0)], "bands": ["class"], "units": "class",
         "kind": "categorical", "nodata": 0, "classes": {1: "dry", 2: "wet"}},
    ]
    cat = write_catalog(tmp / "catalog.yaml", {"crs": 32630, "resolution": 10, "chip_size": 16}, sources)
    return tile(load_catalog(cat), tmp / "chips.zarr", TileOptions(shard_chips=8, split_block=1), show_progress=False)


def test_the_store_holds_integer_nodata_as_its_value(store):
    g = zarr.open_group(str(store), mode="r")
    assert list(g.attrs["inputs"]) == ["opt", "coh"] and list(g.attrs["labels"]) == ["lc"]
    raw = g["opt"][:]
    assert raw.dtype == np.uint16 and g["opt"].attrs["nodata_in_store"] == 0
    assert 0.01 < (raw == 0).mean() < 0.5  # the test is about these pixels
    x = read_masked(g["opt"])
    np.testing.assert_array_equal(np.isnan(x), raw == 0)
    np.testing.assert_array_equal(x[raw != 0], raw[raw != 0].astype(np.float32))
    st = g["opt"].attrs["stats"]["bands"]["B04"]
    assert st["min"] > 0  # the statistics ignore nodata too


def test_training_and_embedding_read_what_read_masked_gives(store):
    g = zarr.open_group(str(store), mode="r")
    cfg = PretrainConfig(store=str(store), method="mae", vit=TINY, batch_size=4)
    groups = resolve_groups(cfg)
    assert [(b.name, b.modality, b.bands) for b in groups] == [("inputs", "opt", ["B04", "B08"]),
                                                               ("inputs", "coh", ["coh12"])]
    ref = np.concatenate([read_masked(g["opt"]), read_masked(g["coh"])], axis=1)  # the one reader, (n, 3, 16, 16)
    mean = np.array([m for b in groups for m in b.mean], np.float32)[None, :, None, None]
    std = np.array([s for b in groups for s in b.std], np.float32)[None, :, None, None]
    z_ref = (ref - mean) / std

    # what pretraining trains on: its own data module (augmentation off), through the method's input
    loader_cfg = make_datamodule(cfg, groups).cfg
    loader_cfg.augment = None
    samples = list(ShardChipDataset(loader_cfg))
    assert samples
    batch = torch.utils.data.default_collate(samples)
    rows = batch["index"].numpy()
    x, valid = group_input(batch, groups)
    np.testing.assert_array_equal(valid.numpy(), np.isfinite(ref[rows]))  # identical masks
    assert not valid.all() and (~valid[:, :2]).any()  # the uint16 zeros are masked
    v = valid.numpy()
    np.testing.assert_allclose(x.numpy()[v], z_ref[rows][v], rtol=1e-6, atol=1e-6)  # identical values elsewhere
    assert (x.numpy()[~v] == 0).all()  # masked pixels at the mean, not at (0 - mean) / std

    # what embedding reads, and what the encoder makes of it
    encoder = MAE(groups, TINY, OptimConfig(), decoder_dim=16, decoder_depth=1).export_encoder()
    arrays = encoder_arrays(g, encoder, str(store))
    seen = torch.cat(list(_chip_batches(arrays, len(ref), 5))).numpy()
    np.testing.assert_array_equal(np.isnan(seen), np.isnan(ref))
    np.testing.assert_array_equal(seen[np.isfinite(ref)], ref[np.isfinite(ref)])
    parts, _ = encoder.split(torch.from_numpy(seen[rows]))
    np.testing.assert_allclose(parts["inputs"].numpy(), x.numpy(), rtol=1e-5, atol=1e-5)  # the same normalisation


def test_the_mae_loss_ignores_masked_pixels():
    torch.manual_seed(0)
    groups = [Group("inputs", "a", ["b0", "b1", "b2"], [0.0] * 3, [1.0] * 3)]
    vit = ViTConfig(size="tiny", patch=4, depth=1, dim=32, heads=2)
    x = torch.randn(6, 3, 16, 16)
    valid = torch.rand(6, 3, 16, 16) > 0.3
    valid[:, :, :4, :4] = False  # the first patch of every chip has no valid pixel
    for norm_pix in (True, False):
        mae = MAE(groups, vit, OptimConfig(), norm_pix_loss=norm_pix, decoder_dim=16, decoder_depth=1).eval()

        def loss(inp, val):
            torch.manual_seed(1)  # the same patch masks
            return mae.forward_loss(inp, val)

        base, pred, mask = loss(x, valid)
        absurd = torch.where(valid, x, torch.full_like(x, 1e30))
        assert loss(absurd, valid)[0].item() == pytest.approx(base.item(), rel=1e-6)
        with_nan = torch.where(valid, x, torch.full_like(x, float("nan")))
        assert loss(with_nan, valid)[0].item() == pytest.approx(base.item(), rel=1e-6)
        if not norm_pix:  # an independent reference: mean over hidden patches with data of their valid squared error
            t, v = mae.patchify(x).numpy(), mae.patchify(valid.float()).numpy() > 0.5
            p, m = pred.detach().numpy(), mask.numpy()
            per = [((p[i, j] - t[i, j])[v[i, j]] ** 2).mean() for i in range(len(t)) for j in range(t.shape[1])
                   if m[i, j] and v[i, j].any()]
            assert base.item() == pytest.approx(float(np.mean(per)), rel=1e-5)
            assert (m[:, 0] == 1).any()  # some hidden first patches, which contribute nothing

    # no valid pixel at all: a loss of 0 with gradients, never NaN
    mae.train()
    none = mae.forward_loss(x, torch.zeros_like(valid))[0]
    none.backward()
    assert none.item() == 0.0
    assert all(torch.isfinite(q.grad).all() for q in mae.parameters() if q.grad is not None)

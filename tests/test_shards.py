"""data/shards.py: a shard written by ShardWriter is byte for byte the shard zarr writes itself."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from helpers import folder_bytes
from sarflow.data.shards import ShardWriter


def _array(root: zarr.Group, name: str, dtype, fill, chips: int, bands: int = 2, size: int = 8, per_shard: int = 4,
           cname: str = "zstd", shuffle: str = "shuffle"):
    return root.create_array(name, shape=(chips, bands, size, size), chunks=(1, bands, size, size),
                             shards=(per_shard, bands, size, size), dtype=dtype, fill_value=fill,
                             compressors=zarr.codecs.BloscCodec(cname=cname, clevel=3, shuffle=shuffle))


def _chips(dtype, fill, n: int, bands: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        data = rng.normal(size=(n, bands, size, size)).astype(dtype)
        data[1] = np.nan  # an empty chip (all fill): left out of the shard
        data[2, 0, :3] = np.nan  # partly empty: kept
    else:
        data = rng.integers(1, 200, size=(n, bands, size, size)).astype(dtype)
        data[1] = fill
        data[2, :, :4] = fill
    return data


@pytest.mark.parametrize("dtype,fill,cname,shuffle", [
    ("float32", float("nan"), "zstd", "shuffle"),
    ("uint8", 0, "zstd", "bitshuffle"),
    ("int16", -1, "lz4", "shuffle"),
    ("float32", 0.0, "lz4", "shuffle"),
])
def test_shards_equal_zarrs_own_write(tmp_path, dtype, fill, cname, shuffle):
    chips = 10  # shards of 4: two whole shards and a partial last one
    data = _chips(dtype, fill, chips)
    if np.dtype(dtype).kind == "f" and fill == 0.0:
        data[5] = 0.0  # all +0.0: empty
        data[6] = -0.0  # all -0.0: data to zarr (bit patterns differ from the fill)
    stores = {}
    for how in ("zarr", "writer"):
        root = zarr.open_group(zarr.storage.LocalStore(tmp_path / how), mode="w", zarr_format=3)
        arr = _array(root, "a", dtype, fill, chips, cname=cname, shuffle=shuffle)
        if how == "zarr":
            for s0 in range(0, chips, 4):
                arr[s0:s0 + 4] = data[s0:s0 + 4]
        else:
            writer = ShardWriter(arr)
            for shard, s0 in enumerate(range(0, chips, 4)):
                writer.write(shard, data[s0:s0 + 4])
        stores[how] = folder_bytes(tmp_path / how)
    assert stores["writer"] == stores["zarr"]
    assert sum(1 for k in stores["zarr"] if k.startswith("a/c/")) == 3
    back = zarr.open_group(zarr.storage.LocalStore(tmp_path / "writer"), mode="r")["a"][:]
    np.testing.assert_array_equal(back, data)


def test_an_all_empty_shard_is_not_written_and_an_old_one_is_removed(tmp_path):
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w", zarr_format=3)
    arr = _array(root, "a", "float32", float("nan"), 8)
    writer = ShardWriter(arr)
    writer.write(1, np.ones((4, 2, 8, 8), "float32"))
    assert (tmp_path / "a" / "c" / "1" / "0" / "0" / "0").exists()
    writer.write(1, np.full((4, 2, 8, 8), np.nan, "float32"))  # a rerun whose chips are all empty
    assert not (tmp_path / "a" / "c" / "1" / "0" / "0" / "0").exists()
    assert np.isnan(arr[4:8]).all()


def test_other_layouts_are_refused(tmp_path):
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w", zarr_format=3)
    arr = root.create_array("b", shape=(8, 2, 8, 8), chunks=(2, 2, 8, 8), shards=(4, 2, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="not a sharded array of one-chip Blosc chunks"):
        ShardWriter(arr)  # two chips a chunk
    plain = root.create_array("c", shape=(8, 2, 8, 8), chunks=(1, 2, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="not a sharded array"):
        ShardWriter(plain)  # no shards


def test_a_shard_that_is_not_whole_is_refused(tmp_path):
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w", zarr_format=3)
    writer = ShardWriter(_array(root, "a", "float32", float("nan"), 10))
    with pytest.raises(ValueError, match="not a whole shard"):
        writer.write(0, np.ones((3, 2, 8, 8), "float32"))  # 3 of the first shard's 4 chips
    with pytest.raises(ValueError, match="not a whole shard"):
        writer.write(2, np.ones((3, 2, 8, 8), "float32"))  # the last shard holds 2 chips
    writer.write(2, np.ones((2, 2, 8, 8), "float32"))

"""Whole shards of a chip array encoded and written in one piece: the bytes zarr itself writes.

zarr-python's sharded write sends every inner chunk through its asynchronous codec pipeline on one
event-loop thread: at 64 px chips that machinery costs more CPU than the compression. A tiling
unit always writes whole shards whose inner chunk is one chip, so `ShardWriter` encodes the
chunks itself with the array's own Blosc codec (numcodecs, which releases the GIL, so callers'
threads encode in parallel) and puts each shard with one write through the array's store.

The layout is zarr's sharding codec with the index at the end: the non-empty chunks in chunk
order, then per chunk (offset, length) as little-endian uint64 (2**64-1 twice for a chunk left
out) and the CRC32C of that index. A chunk equal to the fill value everywhere is left out, as
zarr does with `write_empty_chunks=False`. The tiler creates its arrays in this layout
(tile._create_arrays); an array in any other (another chunk shape, codec chain or index location)
is refused. tests/test_shards.py checks the bytes against zarr's own write.
"""

from __future__ import annotations

import hashlib

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

EMPTY = np.uint64(2**64 - 1)


def _blosc_of(arr: zarr.Array):
    """The numcodecs Blosc that zarr encodes `arr`'s inner chunks with, or None when the array is
    not a sharded array of one-chip chunks with (bytes little-endian, Blosc) inside and (bytes
    little-endian, crc32c) index codecs at the end, with its Blosc settings fixed in the metadata."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner, index = sharding.codecs, sharding.index_codecs
    if (tuple(sharding.chunk_shape) != (1, *arr.shape[1:]) or sharding.index_location != ShardingCodecIndexLocation.end
            or len(inner) != 2 or not isinstance(inner[0], BytesCodec) or not isinstance(inner[1], BloscCodec)
            or len(index) != 2 or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec)
            or (inner[0].endian is not None and inner[0].endian.value != "little")
            or (index[0].endian is not None and index[0].endian.value != "little")):
        return None
    if getattr(inner[1], "_tunable_attrs", None):  # typesize or shuffle fixed by zarr at write time
        return None
    return inner[1]._blosc_codec


class ShardWriter:
    """Encodes chips (`encode_chunk`, thread-safe) and writes whole shards of one chip array
    (`write_encoded(shard, chunks)`, or `write(shard, chips)` for both)."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.blosc = _blosc_of(arr) if arr.shards else None
        if self.blosc is None:
            raise ValueError(f"array {arr.name} is not a sharded array of one-chip Blosc chunks with the index at the "
                             f"end (codecs {arr.metadata.codecs}): not a chip store array this writer can write")
        self.per_shard = arr.shards[0]
        dtype = np.dtype(arr.dtype)
        self.dtype = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        self.fill = np.asarray(arr.metadata.fill_value, dtype=arr.dtype)
        self.fill_nan = dtype.kind == "f" and bool(np.isnan(self.fill))
        self.fill_zero_bits = dtype.kind == "f" and not self.fill_nan and float(self.fill) == 0.0

    def _empty(self, chip: np.ndarray) -> bool:
        """zarr's test for a chunk it leaves out: every value equal to the fill value (NaN equal to
        NaN; for a float fill of zero, the same bits, so -0.0 is data). A chip whose first value is
        not the fill value is data without a pass over it (most chips)."""
        first = chip.flat[0]
        if self.fill_nan:
            return bool(np.isnan(first)) and bool(np.isnan(chip).all())
        if first != self.fill:  # NaN included; -0.0 equals a fill of 0.0 here and is checked bit by bit below
            return False
        if self.fill_zero_bits:
            view = "V" + str(chip.dtype.itemsize)
            return bool((np.ascontiguousarray(chip).view(view) == self.fill.astype(chip.dtype).reshape(1).view(view)[0]).all())
        return bool((chip == self.fill).all())

    def encode_chunk(self, chip: np.ndarray) -> bytes | None:
        """One chip's chunk as zarr stores it, or None for a chip zarr leaves out (all fill)."""
        if self._empty(chip):
            return None
        return bytes(self.blosc.encode(np.ascontiguousarray(chip, dtype=self.dtype)))

    def shard_bytes(self, chunks: list[bytes | None]) -> bytes | None:
        """The shard holding `chunks` (its first chunks; the rest of the shard left empty), or None
        when every chunk is empty (zarr then writes no shard)."""
        n = self.per_shard
        if len(chunks) > n:
            raise ValueError(f"{len(chunks)} chips do not fit a shard of {n}")
        index = np.full((n, 2), EMPTY, dtype="<u8")
        parts, offset = [], 0
        for i, data in enumerate(chunks):
            if data is None:
                continue
            index[i] = (offset, len(data))
            parts.append(data)
            offset += len(data)
        if not parts:
            return None
        raw = index.tobytes()
        parts.append(raw)
        parts.append(np.array([google_crc32c.value(raw)], dtype="<u4").tobytes())
        return b"".join(parts)

    def write_encoded(self, shard: int, chunks: list[bytes | None]) -> tuple[str, int, str] | None:
        """Shard number `shard` (chips shard*per_shard ... onwards) holds exactly these chunks. Returns the
        shard file's path relative to the store's root, its size and SHA-256 (what the store's integrity
        record holds for it, `integrity.record(known=...)`), or None when no shard file is left (all empty)."""
        start = shard * self.per_shard
        end = start + len(chunks)
        if end > self.arr.shape[0] or (len(chunks) < self.per_shard and end < self.arr.shape[0]):
            raise ValueError(f"chips {start}..{end} are not a whole shard of {self.arr.name} "
                             f"(shape {self.arr.shape}, {self.per_shard} chips a shard)")
        key = self.arr.metadata.encode_chunk_key((shard,) + (0,) * (self.arr.ndim - 1))
        data = self.shard_bytes(chunks)
        path = self.arr.store_path / key
        if data is None:
            sync(path.delete())
            return None
        sync(path.set(default_buffer_prototype().buffer.from_bytes(data)))
        return f"{self.arr.path}/{key}", len(data), hashlib.sha256(data).hexdigest()

    def write(self, shard: int, chips: np.ndarray) -> tuple[str, int, str] | None:
        return self.write_encoded(shard, [self.encode_chunk(c) for c in chips])

"""Chip loaders over the chip store (local folder or s3://).

Chips are read with the store's one reader (`chipstore.read_masked`: NaN at nodata, for integer
arrays too). A sample is a dict: for every requested input `k` (the key of its `ModalitySpec`,
default the modality), `k` is a float32 tensor (bands, H, W) normalised with the store's
train-split statistics (z-score per band; dB stays the unit that is z-scored) with masked pixels
set to 0 (the mean), `k_valid` the bool mask (bands, H, W) of the pixels that carry data (losses
ignore the rest), and `k_present` whether the chip has any valid pixel of it. A missing modality
is an explicit zero tensor with `k_valid` all False and `k_present = False`, never another
sample. Categorical modalities come as int64 class codes (`k` shaped (H, W); masked pixels hold
the store's nodata code, -1 where it has none, and `k_valid` is (H, W)).

Two datasets:
- `ChipDataset` (map-style): random access by row, for evaluation and small stores;
- `ShardChipDataset` (iterable): reads whole shards sequentially (one object per array per
  shard on S3) and shuffles within a buffer; shards are split across DataLoader workers and
  DDP ranks. This is the one for throughput on object storage.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from sarflow.data.chipstore import open_chip_group, read_chip_table, read_masked
from sarflow.errors import InputError


@dataclass
class ModalitySpec:
    """What to read of one modality: which bands (default all), under which sample key (default
    the modality's name; two specs of one modality need two keys)."""

    name: str
    bands: list[str] | None = None
    key: str | None = None

    @property
    def input_key(self) -> str:
        return self.key or self.name


@dataclass
class Augment:
    """Geometric augmentations applied identically to every modality of a sample."""

    flips: bool = True
    rot90: bool = True
    resized_crop: tuple[float, float] | None = (0.5, 1.0)  # area fraction range; None disables


@dataclass
class LoaderConfig:
    store: str
    modalities: list[ModalitySpec]
    split: str | None = "train"
    min_valid: float = 0.0  # a chip is read when one of its modalities has more than this fraction of valid pixels
    output_size: int | None = None  # resize chips to this side (e.g. 224); None keeps the chip size
    augment: Augment | None = field(default_factory=Augment)
    shuffle_buffer: int = 512
    seed: int = 0
    cache_mb: float = 256.0  # keep the decoded shards in memory across epochs when the selected chips fit in this


class _StoreView:
    """The store's arrays, band selections and normalisation constants, checked up front."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.group = open_chip_group(cfg.store)
        mods = list(self.group.attrs.get("modalities", []))
        if not mods:
            raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
        keys = [spec.input_key for spec in cfg.modalities]
        if len(set(keys)) != len(keys):
            raise InputError(cfg.store, f"two inputs share a key in {keys}: give each spec of one modality its own key")
        self.table = read_chip_table(cfg.store)
        self.specs = []
        for spec in cfg.modalities:
            if spec.name not in mods:
                raise InputError(cfg.store, f"the store has no modality {spec.name!r} (it has {mods})")
            arr = self.group[spec.name]
            all_bands = list(arr.attrs["bands"])
            bands = spec.bands or all_bands
            missing = [b for b in bands if b not in all_bands]
            if missing:
                raise InputError(cfg.store, f"modality {spec.name!r} has no band(s) {missing} (it has {all_bands})")
            idx = [all_bands.index(b) for b in bands]
            kind = arr.attrs["kind"]
            if kind == "continuous":
                st = arr.attrs["stats"]["bands"]
                mean = np.array([st[b]["mean"] if st[b]["mean"] is not None else 0.0 for b in bands], np.float32)
                std = np.array([st[b]["std"] or 1.0 for b in bands], np.float32)
            else:
                mean = std = None
            self.specs.append((spec.input_key, spec.name, arr, idx, kind, mean, std, arr.attrs.get("nodata_in_store")))
        rows = self.table
        if cfg.split:
            rows = rows[rows["split"] == cfg.split]
        best = rows[[f"valid_{m}" for m in dict.fromkeys(spec.name for spec in cfg.modalities)]].max(axis=1)
        rows = rows[best > cfg.min_valid]
        self.rows = rows.sort_values("index")
        self.indexes = self.rows["index"].to_numpy()
        self.chip_ids = dict(zip(self.rows["index"].to_numpy().tolist(), self.rows["chip_id"].tolist()))
        self.present = {s[0]: dict(zip(self.rows["index"].tolist(), (self.rows[f"valid_{s[1]}"] > 0).tolist()))
                        for s in self.specs}
        self.chip_size = int(self.group.attrs["chip_size"])
        self.shard = int(self.specs[0][2].shards[0]) if self.specs[0][2].shards else int(self.specs[0][2].chunks[0])

    @staticmethod
    def normalise(x: np.ndarray, kind, mean, std, nodata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (n, bands, H, W) from `read_masked` (NaN = masked) -> (float32 z-scores with masked
        pixels at 0, valid mask), or for categorical data (int64 codes, valid mask) of band 0."""
        valid = np.isfinite(x)
        if kind == "continuous":
            z = (x - mean[None, :, None, None]) / std[None, :, None, None]
            z = np.where(valid, z, np.float32(0.0)).astype(np.float32, copy=False)
            return torch.from_numpy(z), torch.from_numpy(valid)
        fill = -1 if nodata in (None, "NaN") else int(nodata)
        codes = np.where(valid[:, 0], x[:, 0], fill).astype(np.int64)
        return torch.from_numpy(codes), torch.from_numpy(valid[:, 0].copy())

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Every requested input for store rows [start, stop) (one contiguous masked read per
        spec): `key` and `key_valid`."""
        out = {}
        for key, _, arr, idx, kind, mean, std, nodata in self.specs:
            bands = None if idx == list(range(arr.shape[1])) else idx
            out[key], out[f"{key}_valid"] = self.normalise(read_masked(arr, slice(start, stop), bands), kind, mean, std,
                                                           nodata)
        return out


def _augment(sample: dict, names: list[str], kinds: dict[str, str], aug: Augment | None, out_size: int | None,
             rng: random.Random) -> dict:
    """The same flips, rotation and crop for every modality of the sample and its valid mask. A
    resized valid mask keeps only output pixels made of valid inputs alone."""
    keys = [k for n in names for k in (n, f"{n}_valid") if k in sample]
    kind_of = {**kinds, **{f"{n}_valid": "mask" for n in names}}
    if aug is not None:
        k = rng.randrange(4) if aug.rot90 else 0
        flip = aug.flips and rng.random() < 0.5
        crop = None
        if aug.resized_crop:
            size = sample[names[0]].shape[-1]
            area = rng.uniform(*aug.resized_crop)
            side = max(4, int(round(size * math.sqrt(area))))
            crop = (rng.randrange(size - side + 1), rng.randrange(size - side + 1), side)
        for n in keys:
            x = sample[n]
            if crop:
                r, c, s = crop
                x = x[..., r:r + s, c:c + s]
            if flip:
                x = torch.flip(x, dims=(-1,))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
            sample[n] = x
    target = out_size
    if aug is not None and aug.resized_crop and target is None:
        target = sample.get("_chip_size")
    if target is not None:
        for n in keys:
            x = sample[n]
            if x.shape[-1] != target:
                kind = kind_of[n]
                if kind == "continuous":
                    x = torch.nn.functional.interpolate(x[None], size=(target, target), mode="bilinear",
                                                        align_corners=False)[0]
                elif kind == "mask":
                    v = x.float()[None] if x.ndim == 3 else x.float()[None, None]
                    v = torch.nn.functional.interpolate(v, size=(target, target), mode="bilinear", align_corners=False)
                    x = (v >= 1.0 - 1e-6)[0] if x.ndim == 3 else (v >= 1.0 - 1e-6)[0, 0]
                else:
                    x = torch.nn.functional.interpolate(x[None, None].float(), size=(target, target),
                                                        mode="nearest")[0, 0].long()
                sample[n] = x
    sample.pop("_chip_size", None)
    return sample


class ChipDataset(Dataset):
    """Map-style: sample i is the i-th selected chip (by store row)."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.view = _StoreView(cfg)
        self.kinds = {s[0]: s[4] for s in self.view.specs}
        self.names = [s[0] for s in self.view.specs]

    def __len__(self) -> int:
        return len(self.view.indexes)

    def __getitem__(self, i: int) -> dict:
        row = int(self.view.indexes[i])
        data = self.view.read_rows(row, row + 1)
        sample = {k: v[0] for k, v in data.items()}
        for n in self.names:
            sample[f"{n}_present"] = torch.tensor(self.view.present[n][row])
        sample["index"] = row
        sample["_chip_size"] = self.view.chip_size
        rng = random.Random(hash((self.cfg.seed, row, torch.initial_seed())))
        return _augment(sample, self.names, self.kinds, self.cfg.augment, self.cfg.output_size, rng)


class ShardChipDataset(IterableDataset):
    """Iterable: whole shards read sequentially, samples shuffled within a buffer.

    Shards are dealt round-robin to (DDP rank, DataLoader worker) pairs, so every chip is read
    once per epoch across all of them. Under DDP every pair yields as many chips (the fewest
    any pair holds that epoch), so every rank steps as many batches: ranks that ran out first
    would wait forever on the others' collectives. Call `set_epoch` to reshuffle between epochs."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.view = _StoreView(cfg)
        self.kinds = {s[0]: s[4] for s in self.view.specs}
        self.names = [s[0] for s in self.view.specs]
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        keep = np.zeros(int(self.view.group.attrs["chips"]), bool)
        keep[self.view.indexes] = True
        self.keep = keep
        n_shards = math.ceil(len(keep) / self.view.shard)
        self.shards = [s for s in range(n_shards) if keep[s * self.view.shard:(s + 1) * self.view.shard].any()]
        size = self.view.chip_size ** 2 * sum(len(s[3]) * 5 for s in self.view.specs)  # float32 + bool per value
        self.cache: dict[int, dict] | None = {} if len(self.shards) * self.view.shard * size <= cfg.cache_mb * 2**20 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.view.indexes)

    def _slots(self) -> tuple[list[int], int, int]:
        """This epoch's shard order, this (rank, worker) pair's slot and the number of slots."""
        order = list(self.shards)
        random.Random(self.cfg.seed + self.epoch).shuffle(order)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return order, self.rank * nw + wid, self.world_size * nw

    def _my_shards(self) -> list[int]:
        order, slot, slots = self._slots()
        return order[slot::slots]

    def _equal_share(self) -> int:
        """The fewest chips any (rank, worker) pair holds this epoch."""
        order, _, slots = self._slots()
        S = self.view.shard
        share = min(int(sum(self.keep[s * S:(s + 1) * S].sum() for s in order[i::slots])) for i in range(slots))
        if share == 0:
            raise InputError(self.cfg.store, f"{len(self.shards)} shard(s) with train chips cannot feed {slots} "
                                             "DDP processes x DataLoader workers: use fewer processes or workers, or "
                                             "a store with smaller shards (tile.shard_chips)")
        return share

    def __iter__(self) -> Iterator[dict]:
        samples = self._samples()
        if self.world_size > 1:  # DDP: the same number of chips from every pair, so the same batches per rank
            samples = itertools.islice(samples, self._equal_share())
        yield from samples

    def _samples(self) -> Iterator[dict]:
        info = get_worker_info()
        rng = random.Random(hash((self.cfg.seed, self.epoch, self.rank, info.id if info else 0)))
        buffer: list[dict] = []
        S = self.view.shard
        for shard in self._my_shards():
            start, stop = shard * S, min((shard + 1) * S, len(self.keep))
            data = self.cache.get(shard) if self.cache is not None else None
            if data is None:
                data = self.view.read_rows(start, stop)
                if self.cache is not None:
                    self.cache[shard] = data
            for j in np.flatnonzero(self.keep[start:stop]).tolist():
                row = start + j
                sample = {k: v[j] for k, v in data.items()}
                for n in self.names:
                    sample[f"{n}_present"] = torch.tensor(self.view.present[n][row])
                sample["index"] = row
                sample["_chip_size"] = self.view.chip_size
                buffer.append(_augment(sample, self.names, self.kinds, self.cfg.augment, self.cfg.output_size, rng))
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer



class ChipDataModule(L.LightningDataModule):
    """Train loader over the shard-aware iterable dataset; each DDP rank gets its own shards.
    `workers`, `pin_memory` and `prefetch_factor` are the DataLoader's knobs."""

    def __init__(self, cfg: LoaderConfig, batch_size: int = 32, workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        super().__init__()
        self.cfg, self.batch_size = cfg, batch_size
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ds = ShardChipDataset(self.cfg, rank=rank, world_size=world)
        kw = dict(num_workers=self.workers, pin_memory=self.pin_memory)
        if self.workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=True)
        return DataLoader(ds, batch_size=self.batch_size, drop_last=True, **kw)

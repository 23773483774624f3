"""Chip loaders over the chip store (local folder or s3://).

A sample is a dict: for every requested modality `m`, `m` is a float32 tensor (bands, H, W)
normalised with the store's train-split statistics (z-score per band; dB stays the unit that
is z-scored), NaN/nodata set to 0 (the mean), and `m_present` says whether the chip has any
valid pixel of it. A missing modality is an explicit zero tensor with `m_present = False`,
never another sample. Categorical modalities come as int64 class codes (`m` shaped (H, W)).

Two datasets:
- `ChipDataset` (map-style): random access by row, for evaluation and small stores;
- `ShardChipDataset` (iterable): reads whole shards sequentially (one object per array per
  shard on S3) and shuffles within a buffer; shards are split across DataLoader workers and
  DDP ranks. This is the one for throughput on object storage.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from sarflow.data.chipstore import open_chip_group, read_chip_table
from sarflow.errors import InputError


@dataclass
class ModalitySpec:
    """What to read of one modality: which bands (default all)."""

    name: str
    bands: list[str] | None = None


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
    min_valid: float = 0.0  # fraction of valid pixels required in the first modality
    output_size: int | None = None  # resize chips to this side (e.g. 224); None keeps the chip size
    augment: Augment | None = field(default_factory=Augment)
    shuffle_buffer: int = 512
    seed: int = 0


class _StoreView:
    """The store's arrays, band selections and normalisation constants, checked up front."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.group = open_chip_group(cfg.store)
        mods = list(self.group.attrs.get("modalities", []))
        if not mods:
            raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
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
            self.specs.append((spec.name, arr, idx, kind, mean, std, arr.attrs.get("nodata_in_store")))
        rows = self.table
        if cfg.split:
            rows = rows[rows["split"] == cfg.split]
        first = cfg.modalities[0].name
        rows = rows[rows[f"valid_{first}"] > cfg.min_valid]
        self.rows = rows.sort_values("index")
        self.indexes = self.rows["index"].to_numpy()
        self.chip_ids = dict(zip(self.rows["index"].to_numpy().tolist(), self.rows["chip_id"].tolist()))
        self.present = {s[0]: dict(zip(self.rows["index"].tolist(), (self.rows[f"valid_{s[0]}"] > 0).tolist()))
                        for s in self.specs}
        self.chip_size = int(self.group.attrs["chip_size"])
        self.shard = int(self.specs[0][1].shards[0])

    def normalise(self, name, raw: np.ndarray, kind, mean, std, nodata) -> torch.Tensor:
        """raw: (n, bands, H, W) -> float32 z-scores with invalid pixels at 0, or int64 classes."""
        if kind == "continuous":
            x = raw.astype(np.float32)
            if nodata not in (None, "NaN"):
                x[raw == nodata] = np.nan
            x = (x - mean[None, :, None, None]) / std[None, :, None, None]
            return torch.from_numpy(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        return torch.from_numpy(raw[:, 0].astype(np.int64))

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Every requested modality for store rows [start, stop) (one contiguous read per array)."""
        out = {}
        for name, arr, idx, kind, mean, std, nodata in self.specs:
            raw = arr[start:stop]
            raw = raw[:, idx] if len(idx) != raw.shape[1] else raw
            out[name] = self.normalise(name, raw, kind, mean, std, nodata)
        return out


def _augment(sample: dict, names: list[str], kinds: dict[str, str], aug: Augment | None, out_size: int | None,
             rng: random.Random) -> dict:
    """The same flips, rotation and crop for every modality of the sample."""
    if aug is not None:
        k = rng.randrange(4) if aug.rot90 else 0
        flip = aug.flips and rng.random() < 0.5
        crop = None
        if aug.resized_crop:
            size = sample[names[0]].shape[-1]
            area = rng.uniform(*aug.resized_crop)
            side = max(4, int(round(size * math.sqrt(area))))
            crop = (rng.randrange(size - side + 1), rng.randrange(size - side + 1), side)
        for n in names:
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
        for n in names:
            x = sample[n]
            if x.shape[-1] != target:
                if kinds[n] == "continuous":
                    x = torch.nn.functional.interpolate(x[None], size=(target, target), mode="bilinear",
                                                        align_corners=False)[0]
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
        self.kinds = {s[0]: s[3] for s in self.view.specs}
        self.names = [s[0] for s in self.view.specs]

    def __len__(self) -> int:
        return len(self.view.indexes)

    def __getitem__(self, i: int) -> dict:
        row = int(self.view.indexes[i])
        data = self.view.read_rows(row, row + 1)
        sample = {n: data[n][0] for n in self.names}
        for n in self.names:
            sample[f"{n}_present"] = torch.tensor(self.view.present[n][row])
        sample["index"] = row
        sample["_chip_size"] = self.view.chip_size
        rng = random.Random(hash((self.cfg.seed, row, torch.initial_seed())))
        return _augment(sample, self.names, self.kinds, self.cfg.augment, self.cfg.output_size, rng)


class ShardChipDataset(IterableDataset):
    """Iterable: whole shards read sequentially, samples shuffled within a buffer.

    Shards are dealt round-robin to (DDP rank, DataLoader worker) pairs, so every chip is read
    once per epoch across all of them. Call `set_epoch` to reshuffle between epochs."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.view = _StoreView(cfg)
        self.kinds = {s[0]: s[3] for s in self.view.specs}
        self.names = [s[0] for s in self.view.specs]
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        keep = np.zeros(int(self.view.group.attrs["chips"]), bool)
        keep[self.view.indexes] = True
        self.keep = keep
        n_shards = math.ceil(len(keep) / self.view.shard)
        self.shards = [s for s in range(n_shards) if keep[s * self.view.shard:(s + 1) * self.view.shard].any()]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.view.indexes)

    def _my_shards(self) -> list[int]:
        order = list(self.shards)
        random.Random(self.cfg.seed + self.epoch).shuffle(order)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + wid, self.world_size * nw
        return order[slot::slots]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        rng = random.Random(hash((self.cfg.seed, self.epoch, self.rank, info.id if info else 0)))
        buffer: list[dict] = []
        S = self.view.shard
        for shard in self._my_shards():
            start, stop = shard * S, min((shard + 1) * S, len(self.keep))
            data = self.view.read_rows(start, stop)
            for j in np.flatnonzero(self.keep[start:stop]).tolist():
                row = start + j
                sample = {n: data[n][j] for n in self.names}
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

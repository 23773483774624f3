"""`ChipEncoder`: what every pretraining method exports and registers.

It takes chips in the store's physical units (dB, coherence, reflectance...), NaN where a pixel,
a channel or a whole source is missing (what `chipstore.read_masked` gives), the channels of
its input `sources` concatenated in their order. `sources` lists (group, store source, bands)
blocks; the blocks of one group are one backbone's channels. It normalises with the train-split
statistics it carries, zeroes what is missing, and returns one embedding per chip. So a
registered encoder embeds chips read straight from the store, with nothing else to know:
`sarflow.features.embed.encoder_arrays` reads exactly its sources.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_channels(sources: list[tuple[str, str, list[str]]]) -> list[tuple[str, list[str]]]:
    """(group, channel names) per group, in order: the band names for a group of one source,
    `source:band` for a group of several."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, modality, bands in sources:
        out.setdefault(name, []).extend((modality, b) for b in bands)
    return [(name, [b for _, b in chans] if len({m for m, _ in chans}) == 1 else [f"{m}:{b}" for m, b in chans])
            for name, chans in out.items()]


class ChipEncoder(nn.Module):
    def __init__(self, sources: list[tuple[str, str, list[str]]], backbones: nn.ModuleDict, projections: nn.ModuleDict,
                 mean: torch.Tensor, std: torch.Tensor, pool: str = "cls", normalize_output: bool = False):
        super().__init__()
        self.sources = [(name, modality, list(bands)) for name, modality, bands in sources]
        order = list(dict.fromkeys(name for name, _, _ in self.sources))
        if [name for name, _, _ in self.sources] != [n for n in order for s in self.sources if s[0] == n]:
            raise ValueError(f"the blocks of a group must be adjacent: {[(n, m) for n, m, _ in self.sources]}")
        self.groups = group_channels(self.sources)
        self.backbones = backbones
        self.projections = projections
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.pool = pool
        self.normalize_output = normalize_output

    @property
    def modalities(self) -> list[str]:
        """The store sources the encoder reads, in channel order (each once)."""
        return list(dict.fromkeys(m for _, m, _ in self.sources))

    @property
    def in_chans(self) -> int:
        return sum(len(b) for _, b in self.groups)

    @property
    def channel_names(self) -> list[str]:
        return [f"{g}:{b}" for g, bands in self.groups for b in bands]

    def split(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Normalised tensors per group with missing values at 0, and which chips have each group."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (batch, {self.in_chans}, H, W) for channels {self.channel_names}, got {tuple(x.shape)}")
        finite = torch.isfinite(x)
        z = torch.where(finite, (x - self.mean[None, :, None, None]) / self.std[None, :, None, None], 0.0)
        out, present, start = {}, {}, 0
        for name, bands in self.groups:
            stop = start + len(bands)
            out[name] = z[:, start:stop]
            present[name] = finite[:, start:stop].flatten(1).any(dim=1)
            start = stop
        return out, present

    def embed_groups(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, _ in self.groups:
            tokens = self.backbones[name](parts[name])
            pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
            out[name] = self.projections[name](pooled)
        return out

    def fuse(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the (normalised, for multimodal) embeddings of the groups a chip has."""
        if len(self.groups) == 1:
            e = next(iter(embeddings.values()))
            return F.normalize(e, dim=-1) if self.normalize_output else e
        stacked = torch.stack([F.normalize(embeddings[n], dim=-1) for n, _ in self.groups], dim=1)
        mask = torch.stack([present[n] for n, _ in self.groups], dim=1).to(stacked.dtype)
        mask = torch.where(mask.sum(dim=1, keepdim=True) > 0, mask, torch.ones_like(mask))
        fused = (stacked * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return F.normalize(fused, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, present = self.split(x)
        return self.fuse(self.embed_groups(parts), present)

"""Segmentation models: `ViTSegmenter` (a registered ChipEncoder's patch tokens -> light decoder)
and `UNet` (from scratch); both take chips in physical units and return per-pixel class probabilities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Segmenter(nn.Module):
    """Shared: class codes, probabilities out, code maps."""

    class_codes: list[int]

    def _set_classes(self, codes: list[int]) -> None:
        self.class_codes = [int(c) for c in codes]
        self.register_buffer("codes", torch.tensor(self.class_codes, dtype=torch.int64))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Chips in physical units (NaN = missing) -> per-pixel class probabilities (B, C, H, W)."""
        return self.logits(x).softmax(dim=1)

    @torch.no_grad()
    def predict_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) class codes (e.g. WorldCover codes)."""
        return self.codes[self.logits(x).argmax(dim=1)]


class ViTSegmenter(Segmenter):
    """A registered ChipEncoder's patch tokens -> light decoder -> per-pixel logits."""

    def __init__(self, encoder: nn.Module, class_codes: list[int], head: str = "progressive", head_dim: int = 64,
                 freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self._set_classes(class_codes)
        self.freeze_encoder = freeze_encoder
        self.head_kind = head
        self.patch = encoder_patch(encoder)
        dim = sum(encoder.backbones[name].dim for name, _ in encoder.groups)
        n = len(class_codes)
        if head == "linear":
            self.decoder = nn.Conv2d(dim, n, kernel_size=1)
        elif head == "progressive":
            stages, width = [], head_dim
            layers: list[nn.Module] = [nn.Conv2d(dim, width, kernel_size=1), nn.GELU()]
            for _ in range(max(0, int(math.floor(math.log2(self.patch))))):
                out = max(16, width // 2)
                stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                           nn.Conv2d(width, out, kernel_size=3, padding=1), nn.GELU()]
                width = out
            self.decoder = nn.Sequential(*layers, *stages, nn.Conv2d(width, n, kernel_size=1))
        else:
            raise ValueError(f"unknown head {head!r}: linear or progressive")
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum of dims, H/patch, W/patch): the patch tokens of every group, concatenated."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the encoder's patch size {self.patch}")
        parts, _ = self.encoder.split(x)
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        maps = []
        for name, _ in self.encoder.groups:
            t = self.encoder.backbones[name](parts[name])[:, 1:]
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw))
        return torch.cat(maps, dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                t = self.tokens(x)
        else:
            t = self.tokens(x)
        out = self.decoder(t)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class UNet(Segmenter):
    """A small U-Net from scratch; normalises physical inputs with the store's train stats."""

    def __init__(self, in_chans: int, class_codes: list[int], mean, std, widths: tuple[int, ...] = (16, 32, 64),
                 channel_names: list[str] | None = None):
        super().__init__()
        if len(widths) < 2:
            raise ValueError("the U-Net needs at least 2 levels")
        self._set_classes(class_codes)
        self.channel_names = list(channel_names or [])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.in_chans = in_chans
        self.down = nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.out = nn.Conv2d(widths[0], len(class_codes), kernel_size=1)
        self.levels = len(widths)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (batch, {self.in_chans}, H, W) for channels {self.channel_names}, got {tuple(x.shape)}")
        z = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return torch.where(torch.isfinite(z), z, torch.zeros_like(z))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        z = self.normalise(x)
        z = F.pad(z, (0, (-w) % m, 0, (-h) % m))
        skips = []
        for i, blk in enumerate(self.down):
            z = blk(z if i == 0 else F.max_pool2d(z, 2))
            skips.append(z)
        for blk, skip in zip(self.up, reversed(skips[:-1])):
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            z = blk(torch.cat([z, skip], dim=1))
        return self.out(z)[..., :h, :w]


def encoder_patch(encoder) -> int:
    patches = {int(encoder.backbones[name].patch) for name, _ in encoder.groups}
    if len(patches) != 1:
        raise ValueError(f"the encoder's groups use different patch sizes {sorted(patches)}")
    return patches.pop()

"""Batched random views of SAR chips for self-distillation (DINO's multi-crop), on the device.

A view is a random resized crop of the chip with a random horizontal flip and a random
multiple of 90 degrees of rotation (one affine resampling), then a per-channel offset: a
calibration gain, which on backscatter in dB (or on its z-score) is an additive shift. There
is no colour jitter: the channels are physical quantities (dB, coherence), and brightness,
saturation or hue changes would invent values no sensor records. Inputs are the loader's
normalised tensors (masked pixels at 0, the train mean), so the shift is in train-split
standard deviations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_views(x: torch.Tensor, n: int, scale: tuple[float, float], size: int,
                 gain_sigma: float = 0.0) -> list[torch.Tensor]:
    """`n` independent views of every chip of `x` (B, C, H, W), each (B, C, size, size): a crop
    of a random area fraction in `scale` at a random place inside the chip, flipped with
    probability 1/2, rotated by k*90 degrees (k uniform in 0..3), resampled bilinearly, plus a
    per-chip, per-channel offset drawn from N(0, gain_sigma)."""
    b, c = x.shape[:2]
    dev, dt = x.device, x.dtype
    out = []
    for _ in range(n):
        s = torch.empty(b, device=dev).uniform_(*scale).sqrt()  # side fraction of the crop
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - s)
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - s)
        flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
        k = torch.randint(0, 4, (b,), device=dev).float() * (torch.pi / 2)
        cos, sin = torch.cos(k).round(), torch.sin(k).round()  # exact quarter turns
        theta = torch.zeros(b, 2, 3, device=dev, dtype=dt)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s * cos * flip, -s * sin, cx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = s * sin * flip, s * cos, cy
        grid = F.affine_grid(theta, (b, c, size, size), align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if gain_sigma > 0:
            v = v + gain_sigma * torch.randn(b, c, 1, 1, device=dev, dtype=dt)
        out.append(v)
    return out

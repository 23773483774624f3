"""Vision Transformer encoders for any channel count, with SDPA attention.

Sizes follow the ViT paper (tiny/small/base); `depth`/`dim` can be overridden for tiny CPU
configs. Position embeddings are fixed 2-D sin-cos, so the same weights take 224 px inputs or
the chip size. No weights are ever downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import nn

from sarflow.params import STAGE_CONFIG

SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


@dataclass(config=STAGE_CONFIG)
class ViTConfig:
    size: str = "tiny"
    patch: int = 16
    in_chans: int = 2
    img_size: int = 224
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0

    def resolved(self) -> tuple[int, int, int]:
        if self.size not in SIZES:
            raise ValueError(f"unknown ViT size {self.size!r}: choose from {sorted(SIZES)}")
        dim, depth, heads = SIZES[self.size]
        dim, depth, heads = self.dim or dim, self.depth or depth, self.heads or heads
        if self.patch < 2:
            raise ValueError(f"patch {self.patch} is not supported")
        if self.img_size < self.patch or self.img_size % self.patch:
            raise ValueError(f"input size {self.img_size} must be a multiple of the patch size {self.patch} (and not smaller)")
        return dim, depth, heads


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position embedding."""
    assert dim % 4 == 0
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out = [torch.sin(x.flatten()[:, None] * omega), torch.cos(x.flatten()[:, None] * omega),
           torch.sin(y.flatten()[:, None] * omega), torch.cos(y.flatten()[:, None] * omega)]
    return torch.cat(out, dim=1)


@lru_cache(maxsize=64)
def pos_embed_on(dim: int, grid: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`sincos_pos_embed` on `device` in `dtype`, made once: no host-to-device copy (and no
    wait for the GPU) on every forward pass. Made outside inference mode, so training can use it."""
    with torch.inference_mode(False), torch.no_grad():
        return sincos_pos_embed(dim, grid).to(device=device, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if return_attention:  # explicit softmax to expose the maps (DINO); same maths as SDPA
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            out, attn = F.scaled_dot_product_attention(q, k, v), None
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), attn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class ViT(nn.Module):
    """A ViT encoder: `forward(x)` gives (B, 1 + N, dim) tokens, CLS first."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim, depth, heads = cfg.resolved()
        self.dim, self.patch = dim, cfg.patch
        self.patch_embed = nn.Conv2d(cfg.in_chans, dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, cfg.mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init)

    def patchify_embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"the encoder takes {self.cfg.in_chans} channels, got {x.shape[1]}")
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        t = self.patch_embed(x)
        grid = t.shape[-1]
        t = t.flatten(2).transpose(1, 2)
        return t + pos_embed_on(self.dim, grid, t.device, t.dtype)[None]

    def forward_tokens(self, tokens: torch.Tensor, return_attention: bool = False):
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        attn = None
        for i, blk in enumerate(self.blocks):
            x, a = blk(x, return_attention and i == len(self.blocks) - 1)
            attn = a if a is not None else attn
        return self.norm(x), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.patchify_embed(x))[0]

    def embed(self, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """One vector per chip: the CLS token or the mean of patch tokens."""
        tokens = self.forward(x)
        return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)

    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N) attention of the CLS token on the patches in the last block."""
        _, attn = self.forward_tokens(self.patchify_embed(x), return_attention=True)
        return attn[:, :, 0, 1:]


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

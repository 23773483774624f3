"""Self-supervised methods as LightningModules: MAE, DINO and CLIP-style multimodal.

Each module trains on batches from `sarflow.training.data` (normalised tensors per input key,
masked pixels at 0, with `<key>_valid` masks and `<key>_present` flags) and exports a
`ChipEncoder` (see encoder.py). A model's input is a list of `Group` blocks: one block is some
bands of one store source; blocks that share a group name are concatenated (in order) into
one encoder's channels. MAE and DINO train one group; CLIP one encoder per group (two or more).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass as config_dataclass
from torch import nn

from sarflow.params import STAGE_CONFIG
from sarflow.training.augment import random_views
from sarflow.training.encoder import ChipEncoder
from sarflow.training.vit import Block, ViT, ViTConfig, pos_embed_on

METHODS = ("mae", "dino", "clip")


@config_dataclass(config=STAGE_CONFIG)
class OptimConfig:
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 10
    max_steps: int = 100


@dataclass
class Group:
    """One block of a model's input: `bands` of the store source `modality`, with the store's
    train-split mean/std per band, in encoder group `name` (blocks sharing a name are one
    encoder's channels). `key` is the batch key the loader gives the block (default: the modality)."""

    name: str
    modality: str
    bands: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    key: str | None = None

    @property
    def input_key(self) -> str:
        return self.key or self.modality


def group_names(groups: list[Group]) -> list[str]:
    """The encoder groups of a list of blocks, in order of first appearance."""
    return list(dict.fromkeys(g.name for g in groups))


def blocks_of(groups: list[Group], name: str) -> list[Group]:
    return [g for g in groups if g.name == name]


def group_input(batch: dict, blocks: list[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, valid) of one encoder group: its blocks' normalised tensors concatenated on channels,
    masked pixels set to 0 here as well (never the value under the mask), and the valid mask
    (all valid where the batch carries none)."""
    xs, vs = [], []
    for b in blocks:
        x = batch[b.input_key]
        v = batch.get(f"{b.input_key}_valid")
        v = torch.ones_like(x, dtype=torch.bool) if v is None else v.to(device=x.device, dtype=torch.bool)
        xs.append(x)
        vs.append(v)
    x, v = (torch.cat(xs, dim=1), torch.cat(vs, dim=1)) if len(xs) > 1 else (xs[0], vs[0])
    return torch.where(v, x, torch.zeros((), dtype=x.dtype, device=x.device)), v


def group_present(batch: dict, blocks: list[Group]) -> torch.Tensor:
    """Whether each chip has any valid pixel of the group (any of its blocks present)."""
    return torch.stack([batch[f"{b.input_key}_present"].bool() for b in blocks], dim=0).any(dim=0)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class SSLModule(L.LightningModule):
    """AdamW with linear warmup then cosine decay (per step), shared by every method."""

    def __init__(self, groups: list[Group], vit: ViTConfig, optim: OptimConfig):
        super().__init__()
        self.groups = [b for n in group_names(groups) for b in blocks_of(groups, n)]  # a group's blocks adjacent
        self.vit_cfg = vit
        self.optim = optim

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "token" in n else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.optim.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.optim.warmup_steps, self.optim.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor([m for g in self.groups for m in g.mean], dtype=torch.float32)
        std = torch.tensor([s for g in self.groups for s in g.std], dtype=torch.float32)
        return mean, std

    def served(self) -> ChipEncoder:
        """The `ChipEncoder` this module exports, sharing its weights (no copy)."""
        raise NotImplementedError

    def export_encoder(self) -> ChipEncoder:
        return copy.deepcopy(self.served()).eval()

    def embed_batch(self, batch: dict) -> torch.Tensor:
        """The served embedding of a loader batch (normalised tensors): what the exported
        encoder gives for these chips, through the same `ChipEncoder.embed_groups` and `fuse`."""
        enc = self.served()
        names = group_names(self.groups)
        parts = {n: group_input(batch, blocks_of(self.groups, n))[0] for n in names}
        present = {n: group_present(batch, blocks_of(self.groups, n)) for n in names}
        return enc.fuse(enc.embed_groups(parts), present)

    def trivial_loss(self, batch: dict) -> float:
        """The loss of a predictor that learned nothing, on this batch (see each method)."""
        raise NotImplementedError


def _vit_for(cfg: ViTConfig, chans: int) -> ViT:
    return ViT(ViTConfig(**{**cfg.__dict__, "in_chans": chans}))


def _sources(groups: list[Group]) -> list[tuple[str, str, list[str]]]:
    return [(g.name, g.modality, list(g.bands)) for g in groups]


def _one_group(groups: list[Group], method: str) -> str:
    names = group_names(groups)
    if len(names) != 1:
        raise ValueError(f"{method} trains one encoder on one input group (its sources' bands concatenated), "
                         f"got groups {names}")
    return names[0]


def _single_encoder(module: SSLModule, vit: ViT, pool: str = "cls") -> ChipEncoder:
    name = group_names(module.groups)[0]
    mean, std = module._stats()
    return ChipEncoder(_sources(module.groups), nn.ModuleDict({name: vit}), nn.ModuleDict({name: nn.Identity()}),
                       mean, std, pool=pool)


# ------------------------------------------------------------------------- MAE

def visible_patches(n: int, mask_ratio: float) -> int:
    """How many of a chip's `n` patches MAE leaves visible (at least one); the rest are masked
    and carry the loss, so MAE needs at least one of each."""
    return max(1, int(round(n * (1 - mask_ratio))))


class MAE(SSLModule):
    """Masked autoencoder: 75% of patches hidden, the loss on the hidden ones only, and there on
    valid pixels only: a masked (nodata) pixel is neither seen nor reconstructed. The served
    embedding pools the encoder's patch tokens (`pool="mean"`, as MAE fine-tunes) or takes its CLS
    token (`pool="cls"`), which the reconstruction loss barely trains."""

    def __init__(self, groups: list[Group], vit: ViTConfig, optim: OptimConfig, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 pool: str = "mean"):
        super().__init__(groups, vit, optim)
        _one_group(groups, "MAE")
        self.save_hyperparameters(ignore=["groups", "vit", "optim"])
        if pool not in ("cls", "mean"):
            raise ValueError(f"MAE pool must be 'cls' or 'mean', not {pool!r}")
        self.mask_ratio, self.norm_pix_loss, self.pool = mask_ratio, norm_pix_loss, pool
        self.chans = sum(len(g.bands) for g in self.groups)
        self.encoder = _vit_for(vit, self.chans)
        dim, p = self.encoder.dim, vit.patch
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, 4.0) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * self.chans)
        self.decoder_dim = decoder_dim
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.vit_cfg.patch
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.vit_cfg.patch, self.chans
        b = x.shape[0]
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def patch_targets(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, valid) per patch, (B, N, p*p*C): masked values at 0; with norm_pix_loss the
        target is standardised with the mean/variance of the patch's valid values only."""
        v = self.patchify(valid.to(x.dtype)) > 0.5
        t = torch.where(v, self.patchify(x).float(), 0.0)
        if self.norm_pix_loss:
            n = v.sum(dim=-1, keepdim=True)
            mu = t.sum(dim=-1, keepdim=True) / n.clamp(min=1)
            var = (torch.where(v, t - mu, 0.0) ** 2).sum(dim=-1, keepdim=True) / (n - 1).clamp(min=1)
            t = torch.where(v, (t - mu) / (var + 1e-6).sqrt(), 0.0)
        return t, v

    def forward_loss(self, x: torch.Tensor, valid: torch.Tensor | None = None, trivial: bool = False):
        """Loss, predictions (B, N, p*p*C) and the patch mask (1 = hidden). `valid` (like x, bool)
        marks the pixels that carry data; without it every pixel does. The loss is the mean over
        hidden patches with at least one valid value of the patch's mean squared error over its
        valid values; a batch with no valid hidden value gives a loss of 0 (still a graph).
        With `trivial`, also the same loss of predicting 0 everywhere (the mean of the z-scored,
        or with norm_pix_loss of the per-patch normalised, targets): what a model that learned
        nothing scores on the same hidden patches."""
        if valid is None:
            valid = torch.isfinite(x)
        valid = valid.to(torch.bool) & torch.isfinite(x)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        pred, mask = self.predict(x)
        target, v = self.patch_targets(x, valid)
        loss = self.masked_loss(pred, target, v, mask)
        if trivial:
            with torch.no_grad():
                return loss, pred, mask, self.masked_loss(torch.zeros_like(target), target, v, mask)
        return loss, pred, mask

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions (B, N, p*p*C), patch mask (B, N), 1 = hidden) of a random masking of x."""
        tokens = self.encoder.patchify_embed(x)
        b, n, d = tokens.shape
        keep = visible_patches(n, self.mask_ratio)
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, d))
        latent, _ = self.encoder.forward_tokens(visible)
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        y = self.decoder_embed(latent)
        fill = self.mask_token.expand(b, n - keep, -1).to(y.dtype)
        seq = torch.cat([y[:, 1:], fill], dim=1)
        seq = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, self.decoder_dim))
        grid = int(math.isqrt(n)) if x.shape[-1] == x.shape[-2] else None
        pos = pos_embed_on(self.decoder_dim, grid, seq.device, seq.dtype) if grid else 0
        seq = torch.cat([y[:, :1], seq + pos], dim=1)
        for blk in self.decoder_blocks:
            seq, _ = blk(seq)
        return self.decoder_pred(self.decoder_norm(seq))[:, 1:], mask

    @staticmethod
    def masked_loss(pred: torch.Tensor, target: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over hidden patches with a valid value of the patch's MSE over its valid values."""
        err = torch.where(v, (pred.float() - target) ** 2, 0.0)
        count = v.sum(dim=-1)
        per_patch = err.sum(dim=-1) / count.clamp(min=1)
        weight = mask * (count > 0).to(mask.dtype)
        total = weight.sum()
        if total == 0:  # nothing valid to reconstruct in this batch: a zero that keeps the graph
            return pred.float().sum() * 0.0
        return (per_patch * weight).sum() / total

    def training_step(self, batch, _):
        x, valid = group_input(batch, self.groups)
        loss, _, _, trivial = self.forward_loss(x, valid, trivial=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/trivial_loss", trivial)
        return loss

    def trivial_loss(self, batch: dict) -> float:
        x, valid = group_input(batch, self.groups)
        with torch.no_grad():
            return float(self.forward_loss(x, valid, trivial=True)[3])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Channel 0 of: `input` (z-scored, masked pixels at 0), `masked` (the visible patches
        only), `target` (what the loss compares to: per-patch normalised with norm_pix_loss) and
        `prediction` (the decoder's output on every patch, nothing of the target pasted in), with
        `hidden` (1 on hidden patches). Target and prediction are on the same scale."""
        valid = torch.isfinite(x) if valid is None else valid.bool() & torch.isfinite(x)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        _, pred, mask = self.forward_loss(x, valid)
        target, v = self.patch_targets(x, valid)
        h, w = x.shape[-2:]
        size = pred.shape[-1]
        m = self.unpatchify(mask[..., None].expand(-1, -1, size).float(), h, w)
        rec = self.unpatchify(pred.float(), h, w)
        tgt = self.unpatchify(torch.where(v, target, float("nan")), h, w)
        out = {"input": x, "masked": x * (1 - m), "target": tgt, "prediction": rec, "hidden": m}
        return {k: t[:, 0].float().cpu().numpy() for k, t in out.items()}

    def served(self) -> ChipEncoder:
        return _single_encoder(self, self.encoder, self.pool)


# ------------------------------------------------------------------------ DINO

class DINOHead(nn.Module):
    """DINO's projection head: an MLP of `layers` linear layers (GELU) to a `bottleneck`, L2-normalised,
    then a weight-normalised linear layer without bias onto `out_dim` prototypes. With
    `norm_last_layer` the prototypes' norms stay 1 (the logits are cosines), as the paper does for ViTs."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128, layers: int = 3,
                 norm_last_layer: bool = True, batch_norm: bool = False):
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods += ([nn.BatchNorm1d(b)] if batch_norm else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last.parametrizations.weight.original0  # the prototypes' norms
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of probability rows, 0 log 0 = 0."""
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1)


class DINO(SSLModule):
    """Self-distillation without labels (Caron et al. 2021). The student sees 2 global and
    `local_crops` local views of each chip (`augment.random_views`: crops, flips, quarter turns,
    per-channel gain), an EMA teacher the global ones; the loss is the student's cross-entropy
    to the teacher over every pair of different views.

    Collapse is kept away as in the paper: the teacher's outputs are centred (an EMA of its
    batch means, `center_momentum`, started at the first batch's mean) and sharpened
    (temperature warmed up linearly from `warmup_teacher_temp` to `teacher_temp` over the first
    `teacher_temp_warmup` of max_steps): centering alone drives the teacher to the uniform
    distribution, sharpening alone to one prototype. The teacher's momentum follows a cosine
    from `ema_start` to 1; the last layer of the student's head stays frozen for the first
    `freeze_last_layer` of the steps and the gradient norm is clipped to `clip_grad` (both in
    `on_before_optimizer_step`). The schedules run on `steps_done`, the optimiser steps taken,
    so they hold with or without a Lightning Trainer.

    The trivial reference is log(out_dim), what a student that outputs the uniform distribution
    scores. The loss is the teacher's entropy plus the student's KL to it, so a sharp teacher
    lowers it by itself; what shows the student learned something about each chip is the loss
    below `train/teacher_batch_entropy`, the entropy of the teacher's batch-mean distribution,
    which is exactly what predicting that mean for every chip scores (`train/teacher_entropy`,
    the mean entropy per view, is the floor)."""

    def __init__(self, groups: list[Group], vit: ViTConfig, optim: OptimConfig, out_dim: int = 1024,
                 local_crops: int = 4, teacher_temp: float = 0.07, student_temp: float = 0.1,
                 center_momentum: float = 0.9, ema_start: float = 0.996, warmup_teacher_temp: float = 0.04,
                 teacher_temp_warmup: float = 0.3, head_hidden: int = 512, head_bottleneck: int = 128,
                 head_batch_norm: bool = False, norm_last_layer: bool = True, freeze_last_layer: float = 0.01,
                 clip_grad: float = 3.0, global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 gain_sigma: float = 0.1):
        super().__init__(groups, vit, optim)
        _one_group(groups, "DINO")
        self.save_hyperparameters(ignore=["groups", "vit", "optim"])
        chans = sum(len(g.bands) for g in self.groups)
        self.student = _vit_for(vit, chans)
        self.student_head = DINOHead(self.student.dim, out_dim, head_hidden, head_bottleneck,
                                     norm_last_layer=norm_last_layer, batch_norm=head_batch_norm)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad = False
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimiser steps: the schedules' clock
        self.local_crops, self.t_temp, self.s_temp = local_crops, teacher_temp, student_temp
        self.warmup_t_temp, self.t_temp_warmup = warmup_teacher_temp, teacher_temp_warmup
        self.center_momentum, self.ema_start = center_momentum, ema_start
        self.freeze_last_layer, self.clip_grad = freeze_last_layer, clip_grad
        self.global_scale, self.local_scale, self.gain_sigma = tuple(global_scale), tuple(local_scale), gain_sigma
        self.stats: dict[str, float] = {}

    def crops(self, x):
        """(2 global views at the chip size, `local_crops` local views at half of it)."""
        size = x.shape[-1]
        p = self.vit_cfg.patch
        local = max(p, (size // 2) // p * p)
        return (random_views(x, 2, self.global_scale, size, self.gain_sigma),
                random_views(x, self.local_crops, self.local_scale, local, self.gain_sigma))

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over the first
        `teacher_temp_warmup` of max_steps, then constant."""
        warm = int(round(self.t_temp_warmup * self.optim.max_steps))
        if step >= warm:
            return self.t_temp
        return self.warmup_t_temp + (self.t_temp - self.warmup_t_temp) * step / max(1, warm)

    def teacher_momentum(self, step: int) -> float:
        """Cosine from `ema_start` at step 0 to 1 at max_steps."""
        progress = min(1.0, step / max(1, self.optim.max_steps))
        return 1 - (1 - self.ema_start) * (math.cos(math.pi * progress) + 1) / 2

    def loss(self, x, step: int | None = None, update_center: bool = True):
        """The loss of a batch of (normalised) chips at schedule `step` (default: the steps done);
        the centre moves only with `update_center` (training), so evaluating changes nothing."""
        globals_, locals_ = self.crops(x)
        t_temp = self.teacher_temperature(int(self.steps_done) if step is None else step)
        with torch.no_grad():
            t_out = [self.teacher_head(self.teacher(v)[:, 0]).float() for v in globals_]
            if update_center and int(self.center_updates) == 0:  # the first batch: no history to centre with
                self.center.copy_(torch.cat(t_out).mean(dim=0, keepdim=True))
            t_probs = [F.softmax((t - self.center) / t_temp, dim=-1) for t in t_out]
        s_out = [self.student_head(self.student(v)[:, 0]).float() for v in globals_ + locals_]
        total, terms = 0.0, 0
        for iq, q in enumerate(t_probs):
            for iv, s in enumerate(s_out):
                if iv == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s / self.s_temp, dim=-1), dim=-1).mean()
                terms += 1
        with torch.no_grad():
            q = torch.cat(t_probs)
            self.stats = {"teacher_entropy": float(entropy(q).mean()),
                          "teacher_batch_entropy": float(entropy(q.mean(dim=0)))}
            if update_center:
                batch_center = torch.cat(t_out).mean(dim=0, keepdim=True)
                self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
                self.center_updates += 1
        return total / terms

    def training_step(self, batch, _):
        loss = self.loss(group_input(batch, self.groups)[0])  # masked pixels at 0 (the mean)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/trivial_loss", self.trivial_loss(batch))
        self.log("train/teacher_temp", self.teacher_temperature(int(self.steps_done)))
        for k, v in self.stats.items():
            self.log(f"train/{k}", v)
        return loss

    def trivial_loss(self, batch: dict) -> float:
        return math.log(self.center.shape[-1])

    def on_before_optimizer_step(self, optimizer):
        """The paper's two guards on the student's update: the head's last layer is not updated
        during the first `freeze_last_layer` of the steps, and the gradient norm is clipped."""
        if int(self.steps_done) < int(round(self.freeze_last_layer * self.optim.max_steps)):
            for p in self.student_head.last.parameters():
                p.grad = None
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.clip_grad)

    def on_train_batch_end(self, *_):
        self.steps_done += 1
        m = self.teacher_momentum(int(self.steps_done))
        with torch.no_grad():
            for ps, pt in zip(list(self.student.parameters()) + list(self.student_head.parameters()),
                              list(self.teacher.parameters()) + list(self.teacher_head.parameters())):
                pt.mul_(m).add_(ps.detach() * (1 - m))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> np.ndarray:
        """(B, heads, h, w): the teacher's last-block CLS attention on the patches."""
        attn = self.teacher.last_attention(x)
        g = x.shape[-1] // self.vit_cfg.patch
        return attn.reshape(attn.shape[0], attn.shape[1], g, -1).float().cpu().numpy()

    def served(self) -> ChipEncoder:
        return _single_encoder(self, self.teacher)


# ------------------------------------------------------------------------ CLIP

class MultiModalCLIP(SSLModule):
    """One encoder per modality group projected into a shared space, trained on two terms:
    InfoNCE over every pair of groups present (each chip's embeddings of two groups against the
    other chips'), and InfoNCE between each chip's fused embedding (`ChipEncoder.fuse`, the one
    served) with modality and channel dropout and its fused embedding of everything it has. So
    the served embedding is trained to stay put when a modality or channel is missing. The
    trivial reference is log(batch size), InfoNCE of embeddings that tell no chip apart."""

    def __init__(self, groups: list[Group], vit: ViTConfig, optim: OptimConfig, embed_dim: int = 256,
                 modality_dropout: float = 0.2, channel_dropout: float = 0.1, init_temperature: float = 0.07):
        super().__init__(groups, vit, optim)
        names = group_names(groups)
        if len(names) < 2:
            raise ValueError(f"CLIP-style training contrasts two or more input groups, got {names}")
        self.save_hyperparameters(ignore=["groups", "vit", "optim"])
        self.encoders = nn.ModuleDict({n: _vit_for(vit, sum(len(g.bands) for g in blocks_of(self.groups, n)))
                                       for n in names})
        self.projections = nn.ModuleDict({n: nn.Linear(self.encoders[n].dim, embed_dim) for n in names})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.modality_dropout, self.channel_dropout = modality_dropout, channel_dropout

    def _inputs(self, batch) -> tuple[dict, dict]:
        names = group_names(self.groups)
        xs = {n: group_input(batch, blocks_of(self.groups, n))[0] for n in names}
        present = {n: group_present(batch, blocks_of(self.groups, n)) for n in names}
        return xs, present

    def _drop(self, xs: dict, present: dict) -> tuple[dict, dict]:
        """Whole groups dropped with probability `modality_dropout` (each chip keeps at least one
        of the groups it has) and channels with `channel_dropout` (each group keeps one)."""
        names = list(xs)
        has = torch.stack([present[n] for n in names], dim=1)
        b, device = has.shape[0], has.device
        keep = (torch.rand(b, len(names), device=device) >= self.modality_dropout) & has
        lost = ~keep.any(dim=1) & has.any(dim=1)
        if lost.any():  # keep one group the chip has, at random
            pick = torch.multinomial(has[lost].float(), 1)[:, 0]
            keep[lost.nonzero()[:, 0], pick] = True
        out_x, out_p = {}, {}
        for i, n in enumerate(names):
            x = xs[n]
            if self.channel_dropout > 0 and x.shape[1] > 1:
                ch = torch.rand(b, x.shape[1], device=device) >= self.channel_dropout
                ch[~ch.any(dim=1), 0] = True
                x = x * ch[:, :, None, None].to(x.dtype)
            out_p[n] = keep[:, i]
            out_x[n] = x * out_p[n][:, None, None, None].to(x.dtype)
        return out_x, out_p

    def embeddings(self, xs):
        return {n: F.normalize(self.projections[n](self.encoders[n](x)[:, 0]), dim=-1) for n, x in xs.items()}

    @staticmethod
    def _info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * a @ b.T
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def loss(self, batch):
        xs, present = self._inputs(batch)
        z = self.embeddings(xs)
        scale = self.logit_scale.exp().clamp(max=100)
        names = list(xs)
        total, terms = 0.0, 0
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = present[a] & present[b]
                if both.sum() >= 2:
                    total = total + self._info_nce(z[a][both], z[b][both], scale)
                    terms += 1
        if self.training:
            dx, dp = self._drop(xs, present)
            enc = self.served()
            full = enc.fuse(z, present)
            dropped = enc.fuse(self.embeddings(dx), dp)
            some = torch.stack([present[n] for n in names], dim=1).any(dim=1)
            if some.sum() >= 2:
                total = total + self._info_nce(dropped[some], full[some], scale)
                terms += 1
        if terms == 0:  # nothing to contrast in this batch: a zero that keeps the graph
            return sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        return total / terms

    def training_step(self, batch, _):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/trivial_loss", self.trivial_loss(batch))
        return loss

    def trivial_loss(self, batch: dict) -> float:
        return math.log(int(batch[self.groups[0].input_key].shape[0]))

    def served(self) -> ChipEncoder:
        mean, std = self._stats()
        return ChipEncoder(_sources(self.groups), self.encoders, self.projections, mean, std, pool="cls",
                           normalize_output=True)


def build_method(method: str, groups: list[Group], vit: ViTConfig, optim: OptimConfig, **kwargs) -> SSLModule:
    classes = {"mae": MAE, "dino": DINO, "clip": MultiModalCLIP}
    if method not in classes:
        raise ValueError(f"unknown method {method!r}: choose from {list(classes)}")
    return classes[method](groups, vit, optim, **kwargs)

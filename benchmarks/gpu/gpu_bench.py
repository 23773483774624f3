#!/usr/bin/env python
"""The GPU check of issue 13, in one process (benchmarks/gpu/run.sh calls it; `--smoke` runs it on
CPU with tiny sizes so CI keeps it alive).

1. Store: the Sen1Floods11 S1 chips of ../shared/data/real (one store per chip, its own grid,
   `--chip` px chips, `bench_science.real_water_stores`); without them a synthetic scene.
2. MAE pretraining, ViT-B (`--vit`), bf16 autocast on CUDA, optionally torch.compile: the
   library's MAE (`sarflow.training.methods.MAE`, its `vit.Block`s) against a plain reference
   of the same transformer (nn.TransformerEncoderLayer, pre-norm, GELU, same widths, same
   masking and per-patch normalised loss on hidden patches) on the same batches, same steps,
   same optimiser: chips/s after warm-up, peak GPU memory, loss first/last and the trivial
   (predict-zero) loss. Anchor: the reference; ratio = library / reference chips/s.
3. Embedding throughput: benchmarks/bench_embed.py (its own anchor, the obvious loop) as a child.
4. Label efficiency with the ViT encoder just trained: water fraction on held-out Sen1Floods11
   regions (`bench_science.efficiency`: linear probe, fixed test set, block-bootstrap
   intervals) against pixel statistics and a random encoder of the same architecture;
   on the synthetic fallback the scene's first multiclass task on its own test split.

Writes gpu_bench.json into --out (default $OUT, else benchmarks/results/gpu/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # bench_science.py and machine.py beside this folder (a script, not the library)

import bench_science as sci  # noqa: E402


# --------------------------------------------------------------------------- reference MAE

class ReferenceMAE(nn.Module):
    """A plain MAE of the same shape as the library's: Conv2d patch embedding + fixed sin-cos
    positions + CLS, nn.TransformerEncoderLayer blocks (pre-norm, GELU, eps 1e-6), a narrow decoder
    of the same kind, loss = per-patch normalised MSE on hidden patches."""

    def __init__(self, chans: int, patch: int, dim: int, depth: int, heads: int, dec_dim: int, dec_depth: int,
                 dec_heads: int, mask_ratio: float = 0.75):
        super().__init__()
        from sarflow.training.vit import sincos_pos_embed

        self.patch, self.chans, self.mask_ratio, self.dim, self.dec_dim = patch, chans, mask_ratio, dim, dec_dim
        self._pos = sincos_pos_embed
        self.patch_embed = nn.Conv2d(chans, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))

        def layer(d, h):
            return nn.TransformerEncoderLayer(d, h, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                              norm_first=True, layer_norm_eps=1e-6)

        self.encoder = nn.TransformerEncoder(layer(dim, heads), depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dec_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder = nn.TransformerEncoder(layer(dec_dim, dec_heads), dec_depth, enable_nested_tensor=False)
        self.dec_norm = nn.LayerNorm(dec_dim)
        self.pred = nn.Linear(dec_dim, patch * patch * chans)
        nn.init.normal_(self.cls, std=0.02), nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p, grid = self.patch, h // self.patch
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = t + self._pos(self.dim, grid).to(t)[None]
        n = t.shape[1]
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        ids_shuffle = torch.rand(b, n, device=x.device).argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        vis = torch.gather(t, 1, ids_shuffle[:, :keep, None].expand(-1, -1, t.shape[-1]))
        z = self.norm(self.encoder(torch.cat([self.cls.expand(b, -1, -1).to(vis.dtype), vis], 1)))
        y = self.dec_embed(z)
        seq = torch.cat([y[:, 1:], self.mask_token.expand(b, n - keep, -1).to(y.dtype)], 1)
        seq = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, self.dec_dim))
        seq = seq + self._pos(self.dec_dim, grid).to(seq)[None]
        out = self.pred(self.dec_norm(self.decoder(torch.cat([y[:, :1], seq], 1))))[:, 1:]
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        target = x.reshape(b, c, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, -1).float()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        loss = ((out.float() - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------- helpers

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_loop(name, model, loss_fn, data: torch.Tensor, steps: int, batch: int, device, warmup: int, lr: float,
               seed: int) -> dict:
    """Same batches (seeded), AdamW, bf16 autocast on CUDA; chips/s over the steps after `warmup`."""
    from sarflow.training.methods import warmup_cosine

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, max(1, steps // 20), steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t_start = [], None
    model.train()
    for step in range(steps):
        if step == warmup:
            _sync(device)
            t_start = time.perf_counter()
        idx = torch.randint(0, len(data), (batch,), generator=g)
        xb = data[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    _sync(device)
    timed = steps - warmup
    secs = time.perf_counter() - t_start if t_start else float("nan")
    losses = [float(v) for v in losses]
    k = max(1, steps // 10)
    return {"name": name, "steps": steps, "timed_steps": timed, "batch": batch,
            "chips_per_s": round(timed * batch / secs, 1) if timed > 0 else None,
            "step_ms": round(1000 * secs / timed, 2) if timed > 0 else None,
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def load_chips(args, work: Path) -> tuple[dict, str, torch.Tensor, list]:
    """(stores, what they are, z-scored chips with NaN -> 0 (N, C, H, W), the library Group)."""
    from sarflow.data.chipstore import open_chip_group, read_masked
    from sarflow.training.pretrain import store_group

    stores, kind = {}, None
    if (sci.REAL / "sen1floods11").is_dir() and not args.synthetic:
        stores, _ = sci.real_water_stores(work / "real", args.chip)
        kind = "sen1floods11"
    if not stores:
        from sarflow.data.catalog import load_catalog
        from sarflow.data.synth import SynthConfig, synthesize
        from sarflow.data.tile import TileOptions, tile
        from sarflow.downstream.synthetic_stores import SMALL_SCENE_SPLIT

        cat = synthesize(work / "synth", SynthConfig(size_px=args.synth_px, chip_size=args.chip, seed=3))
        stores = {"synthetic": str(tile(load_catalog(cat), work / "synth.zarr", TileOptions(overwrite=True, **SMALL_SCENE_SPLIT),
                                        show_progress=False))}
        kind = "synthetic"
    first = next(iter(stores.values()))
    mod = "s1" if kind == "sen1floods11" else "s1grd"
    x = np.concatenate([read_masked(open_chip_group(s)[mod]) for s in stores.values()])
    x = x[np.isfinite(x).mean(axis=(1, 2, 3)) >= 0.5]
    mean, std = np.nanmean(x, axis=(0, 2, 3)), np.nanstd(x, axis=(0, 2, 3))
    group = store_group(open_chip_group(first), first, "inputs", mod, None)
    group.mean, group.std = [float(v) for v in mean], [float(v) for v in std]
    z = np.nan_to_num((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    return stores, kind, torch.from_numpy(z), [group]


def mae_compare(args, data: torch.Tensor, groups, device) -> tuple[dict, nn.Module]:
    from sarflow.training.methods import OptimConfig, build_method
    from sarflow.training.vit import SIZES, ViTConfig

    dim, depth, heads = SIZES[args.vit]
    if args.smoke:
        dim, depth, heads = 64, 2, 2
    vit = ViTConfig(size=args.vit, patch=args.patch, dim=dim, depth=depth, heads=heads)
    dec = dict(decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)
    torch.manual_seed(args.seed)
    lib = build_method("mae", groups, vit, OptimConfig(lr=args.lr, max_steps=args.steps), mask_ratio=0.75,
                       norm_pix_loss=True, **dec).to(device)
    torch.manual_seed(args.seed)
    ref = ReferenceMAE(data.shape[1], args.patch, dim, depth, heads, args.decoder_dim, args.decoder_depth,
                       args.decoder_heads).to(device)
    lib_step = torch.compile(lib.forward_loss) if args.compile else lib.forward_loss
    ref_fwd = torch.compile(ref) if args.compile else ref
    trivial = []

    def lib_loss(model, xb):
        loss, _, _, triv = lib_step(xb, torch.ones_like(xb, dtype=torch.bool), trivial=True)
        trivial.append(triv.detach())
        return loss

    out = {"vit": {"size": args.vit, "dim": dim, "depth": depth, "heads": heads, "patch": args.patch,
                   "chip": int(data.shape[-1]), "tokens": (int(data.shape[-1]) // args.patch) ** 2},
           "decoder": dec, "compile": args.compile, "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
           "chips": int(len(data))}
    data_dev = data.to(device) if device.type == "cuda" else data
    out["reference"] = train_loop("reference nn.TransformerEncoderLayer", ref_fwd, lambda m, xb: m(xb), data_dev,
                                  args.steps, args.batch, device, args.warmup, args.lr, args.seed)
    out["sarflow"] = train_loop("sarflow MAE (vit.Block)", lib, lib_loss, data_dev, args.steps, args.batch, device,
                                args.warmup, args.lr, args.seed)
    out["sarflow"]["trivial_loss"] = float(torch.stack(trivial[-max(1, args.steps // 10):]).float().mean())
    a, b = out["sarflow"]["chips_per_s"], out["reference"]["chips_per_s"]
    out["ratio_sarflow_over_reference"] = round(a / b, 3) if a and b else None
    return out, lib


def label_efficiency(args, stores: dict, kind: str, lib, device) -> dict:
    """Water fraction on held-out Sen1Floods11 regions (or the synthetic store's first multiclass
    task) with the trained encoder, a random one of the same architecture and pixel statistics."""
    import copy

    from sarflow.downstream.baselines import pixel_statistics
    from sarflow.downstream.tasks import store_labels, store_tasks, task_target
    from sarflow.data.chipstore import open_chip_group, read_masked

    enc = lib.export_encoder().float().eval().to(device)
    rnd = copy.deepcopy(enc)
    torch.manual_seed(1234)
    for m in rnd.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()

    def embed(e, store, mod):
        x = read_masked(open_chip_group(store)[mod])
        outs = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for s in range(0, len(x), 512):
                outs.append(e(torch.from_numpy(x[s:s + 512]).to(device)).float().cpu().numpy())
        return np.concatenate(outs)

    mod = "s1" if kind == "sen1floods11" else "s1grd"
    names = list(stores)
    held = [r for r in sci.HELD_OUT_REGIONS if r in stores] if kind == "sen1floods11" else []
    if kind == "sen1floods11" and (not held or len(held) == len(names)):
        held = names[-1:]
    first = stores[names[0]]
    task = next(t for t in store_tasks(first) if t.kind == ("regression" if kind == "sen1floods11" else "multiclass"))
    feats = {"vit_mae": [], "vit_random": [], "pixel_stats": []}
    ys, valid, train, test, blocks = [], [], [], [], []
    for i, r in enumerate(names):
        s = stores[r]
        feats["vit_mae"].append(embed(enc, s, mod))
        feats["vit_random"].append(embed(rnd, s, mod))
        feats["pixel_stats"].append(pixel_statistics(s, (mod,))[0])
        labels, split = store_labels(s)
        y, v = task_target(task, labels, s)
        ys.append(y), valid.append(v), blocks.append(sci.block_ids(s, 4 if held else 2) + i * 10**9)
        if held:  # whole regions held out
            train.append(np.full(len(y), r not in held)), test.append(np.full(len(y), r in held))
        else:  # the store's own spatially blocked split
            train.append(split == "train"), test.append(split == "test")
    feats = {k: np.concatenate(v) for k, v in feats.items()}
    y, v, blocks = np.concatenate(ys), np.concatenate(valid), np.concatenate(blocks)
    ok = v & np.isfinite(feats["pixel_stats"]).all(axis=1)
    tr, te = np.concatenate(train) & ok, np.concatenate(test) & ok
    sizes = (10, 25) if args.smoke else (10, 25, 50, 100, 200, 500)
    rows = sci.efficiency(task, feats, y, tr, te, blocks, sizes, 2 if args.smoke else 5, 20 if args.smoke else 500)
    return {"task": task.name, "metric": task.metric, "held_out": held or "the store's test split",
            "n_train": int(tr.sum()), "n_test": int(te.sum()), "rows": rows}


def embed_throughput(args, out: Path) -> dict:
    cmd = [sys.executable, str(BENCH / "bench_embed.py"), "--out", str(out / "embed.json"),
           "--work", str(Path(args.work) / "embed")]
    if args.smoke:
        cmd += ["--device", "cpu", "--vit", "tiny", "--size-px", "256", "--chip-size", "32", "--batch-size", "16",
                "--repeats", "1"]
    else:
        cmd += ["--device", "cuda", "--vit", args.vit, "--size-px", "4096", "--chip-size", "64", "--patch", "8",
                "--batch-size", "1024", "--repeats", "3"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    res = {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode == 0 and (out / "embed.json").exists():
        res["result"] = json.loads((out / "embed.json").read_text())
    else:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(BENCH / "results" / "gpu"))
    ap.add_argument("--work", default=str(BENCH / "work" / "gpu"))
    ap.add_argument("--vit", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--chip", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=4)
    ap.add_argument("--decoder-heads", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic scene even when the real chips exist")
    ap.add_argument("--synth-px", type=int, default=1024)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.chip, args.patch, args.steps, args.warmup, args.batch, args.synth_px = 32, 8, 6, 2, 8, 256
        args.synthetic = True  # seconds, not minutes: the real chips are the GPU run's
        args.decoder_dim, args.decoder_depth, args.decoder_heads = 32, 1, 2
        args.vit = "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "smoke": args.smoke, "args": vars(args)}
    phase = result["phase_s"] = {}

    def lap(name, t=[time.perf_counter(), time.process_time()]):  # wall and CPU seconds per phase
        phase[name] = {"wall": round(time.perf_counter() - t[0], 1), "cpu": round(time.process_time() - t[1], 1)}
        t[:] = [time.perf_counter(), time.process_time()]

    stores, kind, data, groups = load_chips(args, work)
    result["store"] = {"kind": kind, "regions": list(stores), "chips": int(len(data)), "chip": int(data.shape[-1])}
    lap("store")
    result["mae"], lib = mae_compare(args, data, groups, device)
    lap("mae")
    print(json.dumps({k: result["mae"][k] for k in ("sarflow", "reference", "ratio_sarflow_over_reference")}, indent=1))
    result["label_efficiency"] = label_efficiency(args, stores, kind, lib, device)
    lap("label_efficiency")
    if not args.skip_embed:
        result["embed"] = embed_throughput(args, out)
        lap("embed (child process: wall only)")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = out / "gpu_bench.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path} in {result['seconds']} s")
    return 0 if result.get("embed", {}).get("rc", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

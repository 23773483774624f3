"""The encoder as plain weights + a JSON config, beside the pickled MLflow model.

`pretrain` logs, besides the MLflow model, the run artifacts

    plain_encoder/state_dict.pt  the ChipEncoder's state_dict: tensors only, read with
                                 torch.load(weights_only=True) (no pickled code, no sarflow class)
    plain_encoder/config.json    how to rebuild it: the ViT config of each input group, the input
                                 blocks (group, store source, bands) in channel order, the channel
                                 names, the normalisation mean/std per channel (train split,
                                 physical units), the projections, pooling, output normalisation
                                 and the embedding dimension

(the registered model version's tag `sarflow.plain_encoder` holds their runs:/ URI)

and `load_plain_encoder(folder)` rebuilds a `torch.nn.Module` from those two files. The rebuild
uses only torch and two modules of this package that depend on nothing else of it:
`sarflow.training.vit` (the ViT; it imports `sarflow.params` for its config's validation settings)
and `sarflow.training.encoder` (the normalise / embed / fuse wrapper, torch only) — no MLflow,
Lightning, zarr or pickle. The model takes chips in the store's physical units, NaN where data is
missing, channels in `config["channels"]` order, and returns one embedding per chip: the same
numbers as the registered MLflow model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PLAIN_ENCODER = "plain_encoder"  # the run artifact folder pretrain logs them to (not "encoder": MLflow 3 resolves runs:/<run>/encoder to the logged model of that name)
CONFIG = "config.json"
WEIGHTS = "state_dict.pt"
FORMAT = "sarflow-encoder"
FORMAT_VERSION = 1


def encoder_config(encoder: nn.Module) -> dict:
    """The JSON-able config that rebuilds `encoder` (a `ChipEncoder`) with `build_plain_encoder`."""
    from dataclasses import asdict

    groups = {}
    for name, _ in encoder.groups:
        backbone, proj = encoder.backbones[name], encoder.projections[name]
        if isinstance(proj, nn.Identity):
            projection = {"type": "identity"}
        elif isinstance(proj, nn.Linear):
            projection = {"type": "linear", "in_features": proj.in_features, "out_features": proj.out_features,
                          "bias": proj.bias is not None}
        else:
            raise ValueError(f"cannot export projection {type(proj).__name__} of group {name!r}: "
                             "only Identity and Linear are described in the plain config")
        groups[name] = {"vit": asdict(backbone.cfg), "vit_dim": backbone.dim, "projection": projection}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "inputs": [{"group": g, "source": s, "bands": list(b)} for g, s, b in encoder.sources],
        "channels": encoder.channel_names,
        "in_chans": encoder.in_chans,
        "mean": [float(v) for v in encoder.mean.tolist()],
        "std": [float(v) for v in encoder.std.tolist()],
        "groups": groups,
        "pool": encoder.pool,
        "normalize_output": bool(encoder.normalize_output),
        "embedding_dim": _embedding_dim(groups),
        "input": "float32 (batch, in_chans, H, W) in the store's physical units, NaN where missing; "
                 "H and W multiples of the patch size",
        "output": "float32 (batch, embedding_dim)",
    }


def _embedding_dim(groups: dict) -> int:
    dims = {g["projection"]["out_features"] if g["projection"]["type"] == "linear" else g["vit_dim"]
            for g in groups.values()}
    if len(dims) != 1:
        raise ValueError(f"the groups' embeddings differ in size: {sorted(dims)}")
    return dims.pop()


def save_plain_encoder(encoder: nn.Module, folder: str | Path) -> Path:
    """Writes `config.json` and `state_dict.pt` (CPU float32 tensors) of `encoder` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = encoder_config(encoder)
    state = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in encoder.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
    return folder


def build_plain_encoder(config: dict) -> nn.Module:
    """An untrained encoder with the architecture `config` describes (what `encoder_config` wrote)."""
    from sarflow.training.encoder import ChipEncoder
    from sarflow.training.vit import ViT, ViTConfig

    if config.get("format") != FORMAT or int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} config of version <= {FORMAT_VERSION}: "
                         f"format={config.get('format')!r}, version={config.get('format_version')!r}")
    backbones, projections = nn.ModuleDict(), nn.ModuleDict()
    for name, g in config["groups"].items():
        backbones[name] = ViT(ViTConfig(**g["vit"]))
        p = g["projection"]
        projections[name] = (nn.Identity() if p["type"] == "identity"
                             else nn.Linear(p["in_features"], p["out_features"], bias=p.get("bias", True)))
    sources = [(b["group"], b["source"], list(b["bands"])) for b in config["inputs"]]
    return ChipEncoder(sources, backbones, projections, torch.tensor(config["mean"]), torch.tensor(config["std"]),
                       pool=config["pool"], normalize_output=config["normalize_output"])


def load_plain_encoder(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The encoder saved in `folder` (`config.json` + `state_dict.pt`), rebuilt without the pickle:
    the weights are read with `torch.load(weights_only=True)` and loaded strictly. In eval mode."""
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f}: not found (a plain encoder folder holds {CONFIG} and {WEIGHTS})")
    model = build_plain_encoder(json.loads((folder / CONFIG).read_text()))
    state = torch.load(folder / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()

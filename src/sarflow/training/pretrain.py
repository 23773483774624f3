"""`sarflow pretrain`: train a self-supervised encoder on the chip store, track it in MLflow,
and register the exported `ChipEncoder` as `sarflow-encoder-<method>`.

Runs on CPU for tiny configs and on GPUs when present (bf16 autocast). Several GPUs on one
node: `devices: -1` uses them all with Lightning DDP; the iterable loader deals shards to each
rank, so every chip is seen once per epoch across ranks.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from pydantic.dataclasses import dataclass

from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG, default_tracking_uri
from sarflow.training.export import PLAIN_ENCODER, save_plain_encoder
from sarflow.training.data import Augment, ChipDataModule, LoaderConfig, ModalitySpec
from sarflow.training.monitor import SSLMonitor
from sarflow.training.methods import METHODS, Group, OptimConfig, build_method, group_input, group_names, visible_patches
from sarflow.training.vit import ViTConfig

log = logging.getLogger(__name__)

ONE_GROUP = "inputs"  # the name of MAE's and DINO's one input group by default


@dataclass(config=STAGE_CONFIG)
class PretrainConfig:
    """params.yaml's `pretrain:` section (the store comes from the command). `methods` holds
    extra arguments per method; those of `method` apply, under any `method_kwargs`.

    Inputs come from the store: `modalities` (default: every input source the store declares;
    labels never) and `groups`, a list of (group, source, bands or None) blocks; the blocks of
    one group are one encoder's channels, in order. Without `groups`, MAE and DINO train one
    encoder on every chosen source's bands concatenated, CLIP one encoder per source."""

    store: str
    method: str = "mae"
    modalities: list[str] | None = None  # input sources to use; None: every input source of the store
    groups: list[tuple[str, str, list[str] | None]] | None = None  # (group, source, bands); None: from the store
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(size="tiny", patch=16))
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32
    workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    output_size: int | None = None
    shuffle_buffer: int = 256
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    compile: bool = False
    tracking_uri: str = field(default_factory=default_tracking_uri)
    experiment: str = "sarflow-pretrain"
    register: bool = True
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    monitor_every: int = 0  # steps between embedding checks (collapse, kNN probe); 0: a quarter of max_steps
    monitor_chips: int = 512  # train and val chips the checks embed (each split)

    def __post_init__(self):
        self.method_kwargs = {**self.methods.get(self.method, {}), **self.method_kwargs}


class Throughput(L.Callback):
    """Logs chips/s, the learning rate and peak GPU memory per step, and keeps the loss and
    trivial-loss curves for the figure and the result."""

    def __init__(self):
        self.t0, self.seen, self.losses, self.trivial = None, 0, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen += int(batch["index"].shape[0])
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float().cpu()))
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        module.log("perf/chips_per_s", self.seen / elapsed)
        module.log("train/lr", float(trainer.optimizers[0].param_groups[0]["lr"]))
        trivial = trainer.callback_metrics.get("train/trivial_loss")
        if trivial is not None:
            self.trivial.append(float(trivial))
        if torch.cuda.is_available():
            module.log("perf/gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30)


def store_group(group, store: str, name: str, modality: str, bands: list[str] | None) -> Group:
    """A block of the chip store (zarr `group` opened from `store`): the bands (all when None)
    of one source with the train-split mean/std the store holds; a modality or band the store
    lacks, or categorical data, is an InputError naming the store."""
    mods = list(group.attrs.get("modalities", []))
    if modality not in mods:
        raise InputError(store, f"the store has no modality {modality!r} (it has {mods})")
    arr = group[modality]
    all_bands = list(arr.attrs["bands"])
    bands = list(bands or all_bands)
    missing = [b for b in bands if b not in all_bands]
    if missing:
        raise InputError(store, f"modality {modality!r} has no band(s) {missing} (it has {all_bands})")
    if arr.attrs["kind"] != "continuous":
        raise InputError(store, f"modality {modality!r} is categorical: model inputs must be continuous data")
    st = arr.attrs["stats"]["bands"]
    return Group(name, modality, bands, [st[b]["mean"] or 0.0 for b in bands], [st[b]["std"] or 1.0 for b in bands])


def input_blocks(cfg: PretrainConfig, group) -> list[tuple[str, str, list[str] | None]]:
    """(group, source, bands) blocks of the model's input, from the store's declarations: the
    declared `groups` (restricted to `modalities` when both are given), else every chosen input
    source in one group (MAE, DINO) or one group per source (CLIP)."""
    from sarflow.data.chipstore import continuous_inputs, input_modalities

    if cfg.groups:
        chosen = input_modalities(group, cfg.modalities, where=cfg.store)
    else:  # a categorical layer is no z-score: the encoder reads continuous inputs
        chosen = continuous_inputs(group, cfg.modalities, cfg.store, "the encoder")
    if cfg.groups:
        declared = [(n, m, list(b) if b else None) for n, m, b in cfg.groups]
        input_modalities(group, list(dict.fromkeys(m for _, m, _ in declared)), where=f"{cfg.store} (pretrain.groups)")
        if cfg.modalities:
            unused = [m for m in chosen if m not in {m for _, m, _ in declared}]
            if unused:
                raise InputError(cfg.store, f"modalities {unused} are in no group of pretrain.groups "
                                            f"{[n for n in dict.fromkeys(n for n, _, _ in declared)]}: add them to a group "
                                            "or drop pretrain.groups to group by source")
            declared = [blk for blk in declared if blk[1] in chosen]
        return declared
    if cfg.method == "clip":
        if len(chosen) < 2:
            raise InputError(cfg.store, f"CLIP contrasts two or more input sources and the store has one: {chosen[0]!r} "
                                        f"({'as chosen by --modalities' if cfg.modalities else 'its only input source'}); "
                                        "add another input source to the catalog (or to --modalities), declare "
                                        "pretrain.groups that split its bands into two groups, or use --method mae or dino")
        return [(m, m, None) for m in chosen]
    return [(ONE_GROUP, m, None) for m in chosen]


def resolve_groups(cfg: PretrainConfig) -> list[Group]:
    """The model's input blocks (`Group`s) with the store's statistics, checked against the store
    and the method before anything runs."""
    from sarflow.data.chipstore import open_chip_group

    if cfg.method not in METHODS:
        raise InputError(cfg.method, f"unknown method: choose from {list(METHODS)}")
    group = open_chip_group(cfg.store)
    blocks = input_blocks(cfg, group)
    out = [store_group(group, cfg.store, name, modality, bands) for name, modality, bands in blocks]
    names = group_names(out)
    out = [g for n in names for g in out if g.name == n]  # a group's blocks adjacent, in group order
    counts = {m: sum(g.modality == m for g in out) for m in {g.modality for g in out}}
    for g in out:
        if counts[g.modality] > 1:
            g.key = f"{g.modality}@{g.name}"
    keys = [g.input_key for g in out]
    if len(set(keys)) != len(keys):
        raise InputError(cfg.store, f"pretrain.groups lists a source twice in one group: {blocks}")
    if cfg.method in ("mae", "dino") and len(names) != 1:
        raise InputError(cfg.store, f"{cfg.method} trains one encoder on one input group, pretrain.groups declares {names}: "
                                    "give every block the same group name (their bands are concatenated) or use clip")
    if cfg.method == "clip" and len(names) < 2:
        raise InputError(cfg.store, f"CLIP contrasts two or more input groups, pretrain.groups declares one: {names}")
    size = cfg.output_size or int(group.attrs["chip_size"])
    if size < cfg.vit.patch or size % cfg.vit.patch:
        raise InputError(cfg.store, f"chips of {size} px cannot be cut into {cfg.vit.patch} px patches "
                                    "(the chip must be at least the patch size and a multiple of it)")
    if cfg.method == "mae":
        patches = (size // cfg.vit.patch) ** 2
        ratio = float(cfg.method_kwargs.get("mask_ratio", 0.75))
        if patches - visible_patches(patches, ratio) < 1:
            raise InputError(cfg.store, f"MAE on chips of {size} px with {cfg.vit.patch} px patches has {patches} patch(es) "
                                        f"and masks none of them at mask_ratio {ratio}: nothing to reconstruct, the loss "
                                        "is undefined; use a smaller patch (vit.patch), a larger output_size, or dino/clip")
    return out


class NonFiniteLoss(L.Callback):
    """Stops training at the first loss that is NaN or infinite: a model trained on it is not
    a result, so it is never logged or registered."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise InputError(f"pretrain step {trainer.global_step}",
                             f"the {type(module).__name__} loss is {float(loss.detach().float().cpu())}: training stopped, "
                             "nothing registered (check the store's statistics and nodata, or lower optim.lr)")


def train_chips(cfg: PretrainConfig, data: ChipDataModule) -> int:
    """How many chips the train loader yields per epoch (over all ranks); a batch larger than that
    would yield none (drop_last), so the batch is refused with the fix named."""
    from sarflow.training.data import ShardChipDataset

    n = len(ShardChipDataset(data.cfg))
    if n == 0:
        raise InputError(cfg.store, "the train split has no chip with valid data: nothing to pretrain on")
    if cfg.batch_size > n:
        raise InputError(cfg.store, f"batch_size {cfg.batch_size} is larger than the train split ({n} chips): "
                                    f"pass --batch-size {n} or less (params.yaml pretrain.batch_size)")
    return n


def make_datamodule(cfg: PretrainConfig, groups: list[Group]) -> ChipDataModule:
    loader_cfg = LoaderConfig(
        store=cfg.store,
        modalities=[ModalitySpec(g.modality, g.bands, g.key) for g in groups],
        split="train",
        min_valid=-1.0 if cfg.method == "clip" else 0.0,  # CLIP embeds chips with missing modalities
        output_size=cfg.output_size,
        augment=Augment(),
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
    )
    return ChipDataModule(loader_cfg, cfg.batch_size, cfg.workers, cfg.pin_memory, cfg.prefetch_factor)


def _figures(module, method: str, batch: dict, losses: list[float], outdir: Path, store: str | None = None) -> list[Path]:
    """The loss curve and the method's figure (MAE: `mae_figure`, with the input's units read from
    `store`; DINO: the attention maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(f"{method} training loss")
    fig.tight_layout()
    paths.append(outdir / "loss_curve.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    module.eval()
    blocks = [g for g in module.groups if g.name == module.groups[0].name]
    x, valid = group_input({k: v[:4].to(module.device) for k, v in batch.items() if torch.is_tensor(v)}, blocks)
    if method == "mae":
        units = None
        if store:
            from sarflow.data.chipstore import open_chip_group

            units = open_chip_group(store)[module.groups[0].modality].attrs.get("units")
        paths += mae_figure(module, x, valid, outdir, units)
    elif method == "dino":
        maps = module.attention_maps(x)
        np.save(outdir / "dino_attention.npy", maps)
        paths.append(outdir / "dino_attention.npy")
        heads = maps.shape[1]
        from sarflow.data.quicklook import add_colorbar

        fig, axes = plt.subplots(len(maps), heads + 1, figsize=(1.8 * (heads + 1) + 1.4, 1.8 * len(maps) + 0.4),
                                 squeeze=False, layout="constrained")
        g = module.groups[0]
        top = float(np.nanmax(maps)) if np.isfinite(maps).any() else 1.0
        for i in range(len(maps)):
            im0 = axes[i, 0].imshow(x[i, 0].float().cpu().numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
            for h in range(heads):
                im = axes[i, h + 1].imshow(maps[i, h], cmap="inferno", vmin=0, vmax=top)
                if i == 0:
                    axes[i, h + 1].set_title(f"head {h}", fontsize=8)
            for a in axes[i]:
                a.set_xticks([]), a.set_yticks([])
        axes[0, 0].set_title(f"{g.modality} {g.bands[0]}", fontsize=8)
        add_colorbar(fig, im0, list(axes[:, 0]), f"z-score of {g.modality} {g.bands[0]} [standard deviations]")
        add_colorbar(fig, im, list(axes[:, 1:].ravel()), "class-token attention to each patch [softmax weight]")
        paths.append(outdir / "dino_attention.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths


def mae_reconstruction_fig(module, r: dict[str, np.ndarray], units: str | None = None):
    """The figure of `mae_figure` from `module.reconstruct`'s arrays: columns input, visible
    patches, target, prediction of channel 0 (the first band of the first block), titled with its
    source and band; input and visible patches share a z-score colourbar, target and prediction
    one on the loss's scale (`units`: the store's units of that band, named on the input's bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarflow.data.quicklook import add_colorbar

    g = module.groups[0]
    band = f"{g.modality} {g.bands[0]}"
    scale = "per-patch normalised" if module.norm_pix_loss else "z-score"
    visible = 100 * (1 - float(getattr(module, "mask_ratio", 0.75)))
    n = len(r["input"])
    fig, axes = plt.subplots(n, 4, figsize=(9.5, 2 * n + 0.6), squeeze=False, layout="constrained")
    columns = (("input", f"input: {band}"), ("masked", f"visible {visible:.0f} % of patches"),
               ("target", f"target ({scale})"), ("prediction", "prediction"))
    ims = {}
    for i in range(n):
        for j, (key, title) in enumerate(columns):
            ims[key] = axes[i, j].imshow(r[key][i], cmap="gray", vmin=-2.5, vmax=2.5)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            axes[i, j].set_title(title if i == 0 else "", fontsize=8)
    add_colorbar(fig, ims["masked"], list(axes[:, :2].ravel()),
                 f"z-score of {band}" + (f" ({units})" if units else "") + " [train-split standard deviations]")
    add_colorbar(fig, ims["prediction"], list(axes[:, 2:].ravel()),
                 f"{band}, {scale} [standard deviations]")
    return fig


def mae_figure(module, x: torch.Tensor, valid: torch.Tensor, outdir: Path, units: str | None = None) -> list[Path]:
    """mae_reconstructions.png (and .npz of what it shows): per chip the input, the visible
    patches, the target the loss compares to and the decoder's prediction, both on the loss's
    scale (per-patch normalised with norm_pix_loss): model outputs only, no target statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = module.reconstruct(x, valid)
    np.savez(outdir / "mae_reconstructions.npz", **r)
    fig = mae_reconstruction_fig(module, r, units)
    fig.savefig(outdir / "mae_reconstructions.png", dpi=80)
    plt.close(fig)
    return [outdir / "mae_reconstructions.png", outdir / "mae_reconstructions.npz"]


def pretrain(cfg: PretrainConfig, show_progress: bool = False) -> dict:
    """Trains, tracks and registers; returns run id, model URI, registered version and losses."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.models import infer_signature

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import loggable_params, model_requirements, setup_mlflow
    from sarflow.training.distributed import is_main_process, main_run, topology, trainjob_tag

    groups = resolve_groups(cfg)
    L.seed_everything(cfg.seed, workers=True)
    module = build_method(cfg.method, groups, cfg.vit, cfg.optim, **cfg.method_kwargs)
    if cfg.compile:
        module = torch.compile(module)
    data = make_datamodule(cfg, groups)
    n_train = train_chips(cfg, data)
    lineage = dataset_lineage(cfg.store)
    main = is_main_process()  # under torchrun only global rank 0 talks to MLflow (training.distributed)
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment) if main else None
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    params = {"method": cfg.method, "batch_size": cfg.batch_size, "output_size": cfg.output_size,
              "groups": [(g.name, g.modality, g.bands) for g in groups], "modalities": list(dict.fromkeys(g.modality for g in groups)),
              "in_chans": sum(len(g.bands) for g in groups), **{f"vit_{k}": v for k, v in asdict(cfg.vit).items() if k != "in_chans"},
              **{f"optim_{k}": v for k, v in asdict(cfg.optim).items()}, **cfg.method_kwargs,
              "precision": "bf16-mixed" if gpu else "32-true"}
    with main_run(exp_id, lineage | trainjob_tag()) as run:  # None on the other ranks: they log nothing
        if main:
            mlflow.log_params(loggable_params(params))
            mlflow.log_params({k: v for k, v in lineage.items()})
            mlflow.log_param("train_chips", n_train)
        logger = MLFlowLogger(tracking_uri=cfg.tracking_uri, run_id=run.info.run_id,
                              experiment_name=cfg.experiment) if main else False
        throughput = Throughput()
        monitor = SSLMonitor(cfg.store, data.cfg.modalities, data.cfg.min_valid,
                             every=cfg.monitor_every or max(1, cfg.optim.max_steps // 4), max_chips=cfg.monitor_chips)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=max(1, cfg.optim.max_steps))
            trainer = L.Trainer(
                max_steps=cfg.optim.max_steps, accelerator=cfg.accelerator, **topology(cfg.devices, gpu),
                precision="bf16-mixed" if gpu else "32-true", logger=logger, callbacks=[throughput, NonFiniteLoss(), monitor, ckpt],
                log_every_n_steps=1, enable_progress_bar=show_progress, enable_model_summary=False,
            )
            trainer.fit(module, datamodule=data)
            if trainer.global_rank != 0:
                return {}
            batch = next(iter(data.train_dataloader()))
            for f in _figures(module, cfg.method, batch, throughput.losses, Path(tmp), cfg.store):
                mlflow.log_artifact(str(f), artifact_path="figures")
            if Path(tmp, "last.ckpt").exists():
                mlflow.log_artifact(str(Path(tmp, "last.ckpt")), artifact_path="checkpoints")
        encoder = module.export_encoder().cpu().float()
        example = _example_input(cfg, groups)
        with torch.no_grad():
            out = encoder(torch.from_numpy(example)).numpy()
        name = f"sarflow-encoder-{cfg.method}"
        info = mlflow.pytorch.log_model(  # pickle: it loads back as the ChipEncoder, not an exported graph
            encoder, name="encoder", signature=infer_signature(example, out), input_example=example,
            serialization_format="pickle", pip_requirements=model_requirements(),
            registered_model_name=name if cfg.register else None,
        )
        mlflow.log_metric("train/final_loss", throughput.losses[-1])
        health = pretrain_health(throughput, monitor)
        mlflow.log_metric("train/final_trivial_loss", health["trivial_loss"])
        mlflow.set_tag("sarflow.collapse", health["collapse_reason"] or "no")
        with tempfile.TemporaryDirectory() as tmp:  # the same encoder without the pickle: weights + JSON config
            mlflow.log_artifacts(str(save_plain_encoder(encoder, Path(tmp) / "encoder")), artifact_path=PLAIN_ENCODER)
        version = None
        if cfg.register:
            client = mlflow.MlflowClient()
            version = info.registered_model_version
            for k, v in lineage.items():
                client.set_model_version_tag(name, version, k, v)
            client.set_model_version_tag(name, version, "sarflow.embedding_dim", str(out.shape[1]))
            client.set_model_version_tag(name, version, "sarflow.channels", ",".join(encoder.channel_names))
            client.set_model_version_tag(name, version, "sarflow.inputs", ",".join(encoder.modalities))
            client.set_model_version_tag(name, version, "sarflow.plain_encoder", f"runs:/{run.info.run_id}/{PLAIN_ENCODER}")
    return {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "registered_model": name if cfg.register else None,
        "version": version,
        "losses": throughput.losses,
        "embedding_dim": int(out.shape[1]),
        "channels": encoder.channel_names,
        "in_chans": encoder.in_chans,
        "sources": encoder.sources,
        "plain_encoder_uri": f"runs:/{run.info.run_id}/{PLAIN_ENCODER}",
        "lineage": lineage,
        **health,
    }


def pretrain_health(throughput: Throughput, monitor: SSLMonitor, tail: int = 10) -> dict:
    """What says whether the encoder learned: the mean loss and trivial loss of the last `tail`
    steps, the embedding checks before and after training, collapse and the kNN probes."""
    n = min(tail, len(throughput.losses))
    last = monitor.last
    return {
        "final_loss": float(np.mean(throughput.losses[-n:])),
        "trivial_loss": float(np.mean(throughput.trivial[-n:])) if throughput.trivial else float("nan"),
        "collapse": bool(last.get("collapse")),
        "collapse_reason": last.get("collapse_reason"),
        "embedding": {k: last.get(k) for k in ("effective_rank", "std", "median_cosine")},
        "embedding_before": {k: monitor.history[0].get(k) for k in ("effective_rank", "std", "median_cosine")}
        if monitor.history else {},
        "knn": last.get("knn", {}),
    }


def _example_input(cfg: PretrainConfig, groups: list[Group]) -> np.ndarray:
    """Two real chips from the store, in physical units, as the model's input example: read with
    the one reader (`read_masked`), the chips with the most valid pixels, masked pixels at the
    store's train mean (an example for the signature, not a masked chip)."""
    from sarflow.data.chipstore import open_chip_group, read_masked

    g = open_chip_group(cfg.store)
    n = int(g.attrs["chips"])
    parts = []
    for grp in groups:
        arr = g[grp.modality]
        idx = [list(arr.attrs["bands"]).index(b) for b in grp.bands]
        parts.append(read_masked(arr, slice(0, min(n, 16)), idx))
    x = np.concatenate(parts, axis=1)
    best = np.argsort(-np.isfinite(x).reshape(len(x), -1).mean(axis=1), kind="stable")[:2]
    x = x[np.sort(best)]
    mean = np.array([m for grp in groups for m in grp.mean], np.float32)[None, :, None, None]
    x = np.where(np.isfinite(x), x, mean).astype(np.float32)
    if cfg.output_size and cfg.output_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(cfg.output_size,) * 2, mode="bilinear",
                                            align_corners=False).numpy()
    return x

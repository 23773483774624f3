"""The configuration of a segmentation run (`run_segmentation`) and its checks."""

from __future__ import annotations

from dataclasses import field

from pydantic.dataclasses import dataclass

from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG, default_tracking_uri


@dataclass(config=STAGE_CONFIG)
class SegmentConfig:
    """params.yaml's `segment:` section (the store and the encoder come from the command)."""

    store: str
    tracking_uri: str = field(default_factory=default_tracking_uri)
    encoder_uri: str | None = None  # e.g. models:/sarflow-encoder-mae/1; None trains only the U-Net
    label_modality: str | None = None  # a categorical label of the store (default: its only one)
    groups: list[tuple[str, str, list[str] | None]] | None = None  # (group, modality, bands); default: the encoder's,
    # else one group per input source (`modalities`)
    modalities: tuple[str, ...] = ()  # the U-Net's inputs without an encoder (default: the store's continuous inputs)
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    encoder_lr_scale: float = 0.1  # fine-tuning: the encoder learns at lr * this
    freeze_encoder: bool = False  # True: head on frozen tokens (linear-probe-like); False: full fine-tune
    head: str = "progressive"  # "linear" (1x1 conv + bilinear) or "progressive" (x2 upsampling stages)
    head_dim: int = 64
    unet_widths: tuple[int, ...] = (16, 32, 64)
    train_unet: bool = True
    label_fractions: tuple[float, ...] = ()  # extra label-efficiency points, e.g. (0.1,): fraction of train chips
    augment: bool = True  # random flips / 90-degree rotations of each batch
    val_split: str = "val"  # chooses the model to register
    test_split: str = "test"  # scored once, at the end
    plot_chips: int = 4
    experiment: str = "sarflow-segmentation"
    register: bool = True  # registers the better of the two (by val mIoU) as sarflow-segmentation-<label>
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (None: leave torch's setting)


def check_config(cfg: SegmentConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise InputError("segment config", f"steps ({cfg.steps}), batch_size ({cfg.batch_size}) and lr ({cfg.lr}) must be positive")
    if cfg.head not in ("linear", "progressive"):
        raise InputError("segment config", f"head must be linear or progressive, not {cfg.head!r}")
    bad = [f for f in cfg.label_fractions if not 0 < f <= 1]
    if bad:
        raise InputError("segment config", f"label fractions must be in (0, 1], got {bad}")
    if cfg.encoder_uri is None and not cfg.train_unet:
        raise InputError("segment config", "nothing to train: give an encoder URI or keep the U-Net")

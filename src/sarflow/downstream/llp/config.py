"""The configuration of an LLP run (`run_llp`): inputs, models, training, split, outputs."""

from __future__ import annotations

from dataclasses import field

from pydantic.dataclasses import dataclass

from sarflow.params import STAGE_CONFIG, default_tracking_uri

MODELS = ("linear", "mlp", "kdm", "conv")


@dataclass(config=STAGE_CONFIG)
class LLPConfig:
    """params.yaml's `llp:` section (the store and the bags' polygons come from the command)."""

    store: str
    polygons: str
    tracking_uri: str = field(default_factory=default_tracking_uri)
    id_column: str = "muni_id"
    stats: str | None = None  # CSV: id_column, frac_<class>... (optionally valid_pixels)
    label_raster: str | None = None  # or: aggregate bag proportions from a coarse label raster
    label_nodata: float | None = None  # nodata of the label raster (default: the store's declared nodata of the label,
    # else the raster's own tag; none known: refused)
    features_root: str | None = None  # embeddings partitions; the bags are written here
    model: str | None = None  # embeddings partition (default: the newest)
    version: str | None = None
    models: tuple[str, ...] = MODELS
    loss: str = "kl"
    steps: int = 300  # at most: with val_fraction > 0 the steps are chosen on held-out training bags
    lr: float = 0.03
    val_fraction: float = 0.25  # training bags held out to choose the steps and the model (0: defaults)
    classes: tuple[int, ...] | None = None  # default: the statistics' classes, or the label's declared ones
    experiment: str = "sarflow-llp"
    register: bool = True
    task: str | None = None  # default llp-<label> (registered as sarflow-llp-<label>)
    seed: int = 0
    split: str = "bags"  # "bags": held-out bags; "store": bags with train chips, scored on the store's test chips
    test_fraction: float = 0.3
    bag_sizes: tuple[int, ...] = (1, 2, 4, 8)  # bags merged per bag for the curve
    curve_model: str = "linear"
    hidden: int = 32
    prototypes: int = 48
    conv_stride: int = 8
    pixel_modalities: tuple[str, ...] = ()  # the conv model's inputs (default: the store's continuous inputs)
    truth_modality: str | None = None  # the label the proportions are of (default: the store's one categorical label)
    out_dir: str | None = None  # table and plots (default <features_root>/llp or a temp folder)

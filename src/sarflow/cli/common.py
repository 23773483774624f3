"""What every `sarflow` command shares: how an error ends it, the --params option, and the one
path from params.yaml to a stage's typed config (its section, the command's flags on top)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import typer

ParamsOpt = typer.Option(None, "--params", help="params.yaml to read (default: ./params.yaml when present)")
TrackingOpt = typer.Option(None, "--tracking-uri",
                           help="MLflow tracking URI (default: the section's tracking_uri, else $MLFLOW_TRACKING_URI, "
                                "else sqlite:///mlflow.db)")

# params.yaml section -> the stage config that reads it (module:class); a section not named here is refused
STAGE_CONFIGS = {
    "synth": "sarflow.data.synth:SynthConfig",
    "tile": "sarflow.data.tile:TileOptions",
    "pretrain": "sarflow.training.pretrain:PretrainConfig",
    "embed": "sarflow.features.embed:EmbedConfig",
    "features": "sarflow.features.feast_store:FeatureConfig",
    "promote": "sarflow.mlops.registry:PromoteConfig",
    "downstream": "sarflow.downstream.probes:ProbeConfig",
    "llp": "sarflow.downstream.llp.config:LLPConfig",
    "segment": "sarflow.downstream.segmentation.config:SegmentConfig",
}


def fail(e: Exception) -> None:
    """Prints `error: <e>` on stderr and exits with status 2."""
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def config_class(section: str):
    """The stage config class that reads params.yaml's `section`."""
    module, _, name = STAGE_CONFIGS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def read_params(path: Path | None):
    """params.yaml (or `path`), its top-level sections checked against the stages that read them."""
    from sarflow.params import check_sections, load_params

    params = load_params(path)
    check_sections(params, STAGE_CONFIGS)
    return params


def stage_config(section: str, params: Path | dict | None, overrides: dict[str, Any] | None = None, **given):
    """The typed config of the stage that reads `section`: params.yaml's section (from the file
    `params`, or an already read mapping), the command's flags (`overrides`, None = not given)
    on top, and the values the command supplies itself (`given`)."""
    from sarflow.params import stage_config as build

    p = params if isinstance(params, dict) else read_params(params)
    return build(config_class(section), p, section, overrides, **given)


def check_params(params: dict) -> None:
    """Every section of `params` validated by its stage config (required fields the command
    supplies are filled with placeholders), so a bad key fails before anything runs."""
    import dataclasses

    from sarflow.params import check_sections

    check_sections(params, STAGE_CONFIGS)
    for section in params:
        cls = config_class(section)
        required = {f.name: "" for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        stage_config(section, params, **required)

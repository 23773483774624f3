"""What every `sarflow` command shares: how an error ends it, the --params option, paths made
absolute at the door, and the one path from params.yaml to a stage's typed config (its section,
the command's flags on top).

Paths: every path-like argument and option of every command goes through :func:`absolute_path`
(a typer callback: local paths resolved against the working directory, ``~`` expanded,
``s3://`` kept), the tracking URI through :func:`absolute_tracking_uri` (a relative
``sqlite:///mlflow.db`` made absolute), and the path keys of a params file read by a command
(``PATH_KEYS``) likewise, so everything a stage records (MLflow tags, Feast sources, DVC
remotes, JSON summaries) names the same place from any other working directory.

Vocabulary (tests/test_cli_vocabulary.py walks every command): one flag per idea. `--features-root`
is a features root (`--root` is its retired spelling, still read), `--out` an output file or folder
(`--out-dir` retired likewise), `--tracking-uri` the MLflow tracking URI, `--params` params.yaml;
`--model` always names a registered model by one rule (sarflow.mlops.registry.MODEL_RULE, resolved
by resolve_model_ref): models:/NAME/VERSION, models:/NAME@ALIAS, or a bare NAME for its newest
version (for a command that reads embeddings: the newest version under the features root); and
every option and argument has help text."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import typer

from components.paths import absolute, absolute_like, absolute_uri


def absolute_path(value):
    """Typer callback: what the user typed for a path (a Path, a str, a list of them), resolved
    against the working directory once, here; ``s3://`` URIs, None and "" unchanged."""
    return absolute_like(value)


def absolute_tracking_uri(value: str | None) -> str | None:
    """Typer callback for --tracking-uri: a relative SQLite file made absolute, any other URI unchanged."""
    return absolute_uri(value)


ParamsOpt = typer.Option(None, "--params", callback=absolute_path,
                         help="params.yaml to read (default: ./params.yaml when present)")
TrackingOpt = typer.Option(None, "--tracking-uri", callback=absolute_tracking_uri,
                           help="MLflow tracking URI (default: the section's tracking_uri, else $MLFLOW_TRACKING_URI, "
                                "else sqlite:///mlflow.db)")

FEATURES_ROOT_HELP = ("features root: the offline store (embeddings/, labels/, bags/): a local folder or an s3:// prefix "
                      "(endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); "
                      "default params features.root")
# the one spelling of a features root; --root, the retired spelling, is still read (never the primary name)
FeaturesRootOpt = typer.Option(None, "--features-root", "--root", callback=absolute_path, help=FEATURES_ROOT_HELP)
_RULE = ("models:/NAME/VERSION, models:/NAME@ALIAS (the version the alias points at) or a bare registered NAME (its "
         "newest version{where})")
MODEL_HELP = "model: " + _RULE.format(where="")
EMBEDDINGS_MODEL_HELP = ("the embeddings of this model: " + _RULE.format(where=" embedded under the features root")
                         + "; default: the newest embeddings")
VersionOpt = typer.Option(None, "--version", hidden=True,
                          help="deprecated: write --model models:/NAME/VERSION (the embeddings version, beside a bare NAME)")


def embeddings_model(model: str | None, version: str | None = None,
                     tracking_uri: str | None = None) -> tuple[str | None, str | None]:
    """--model (and the deprecated --version) of a command that reads embeddings -> (NAME, VERSION)
    of the partition, under the one rule of every --model (sarflow.mlops.registry.resolve_model_ref):
    an alias is looked up in the registry, a bare NAME is (NAME, None): its newest version under
    the features root."""
    if model is None:
        return None, version
    from sarflow.errors import InputError
    from sarflow.mlops.registry import resolve_model_ref
    from sarflow.params import default_tracking_uri

    name, found = resolve_model_ref(model, tracking_uri or default_tracking_uri(), newest_in_registry=False)
    if found is not None and version is not None and str(version) != found:
        raise InputError(model, f"names version {found}, --version says {version}: give the version once")
    return name, found if found is not None else version


def registered_model_uri(ref: str | None, tracking_uri: str | None = None) -> str | None:
    """An encoder reference a command loads (--encoder) under the same rule: a bare registered NAME
    becomes models:/NAME/<its newest version> (resolve_model_ref); models:/NAME/VERSION and
    models:/NAME@ALIAS (MLflow resolves the alias when it loads), runs:/... URIs and local paths
    pass unchanged."""
    if not ref or "/" in ref or ":" in ref or "@" in ref or Path(ref).exists():
        return ref
    from sarflow.mlops.registry import resolve_model_ref
    from sarflow.params import default_tracking_uri

    name, version = resolve_model_ref(ref, tracking_uri or default_tracking_uri())
    return f"models:/{name}/{version}"


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


# params.yaml keys that name a local path (or an s3:// prefix): made absolute when a command reads
# the file (read_params), like the same value given as a flag; every section's tracking_uri too
PATH_KEYS = {
    "features": ("root", "repo"),
    "pretrain": ("store",),
    "downstream": ("store", "features_root", "out_dir"),
    "llp": ("store", "polygons", "stats", "label_raster", "features_root", "out_dir"),
    "segment": ("store",),
}


def verbose_logging() -> bool:
    """Whether `sarflow -v` was given (the app's callback sets the root logger to DEBUG)."""
    import logging

    return logging.getLogger().level <= logging.DEBUG and logging.getLogger().level != logging.NOTSET


def fail(e: Exception) -> None:
    """Prints `error: <e>` on stderr and exits with status 2."""
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def config_class(section: str):
    """The stage config class that reads params.yaml's `section`."""
    module, _, name = STAGE_CONFIGS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def read_params(path: Path | None, resolve: bool = True):
    """params.yaml (or `path`), its top-level sections checked against the stages that read them;
    with `resolve`, its path keys (PATH_KEYS) and tracking URIs made absolute against the working
    directory (off for a pipeline compiled or submitted to a cluster, whose paths are the cluster's)."""
    from sarflow.params import Params, check_sections, load_params

    params = load_params(path)
    check_sections(params, STAGE_CONFIGS)
    if not resolve:
        return params
    sections = {}
    for name, section in params.items():
        if isinstance(section, dict):
            section = dict(section)
            for key in PATH_KEYS.get(name, ()):
                if isinstance(section.get(key), str):
                    section[key] = absolute(section[key])
            if isinstance(section.get("tracking_uri"), str):
                section["tracking_uri"] = absolute_uri(section["tracking_uri"])
        sections[name] = section
    return Params(sections, params.source)


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

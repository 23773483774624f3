"""`sarflow features ...`: the feature store from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from sarflow.cli.common import (EMBEDDINGS_MODEL_HELP, FeaturesRootOpt, ParamsOpt, VersionOpt, absolute_path,
                                embeddings_model, fail, stage_config)
from sarflow.errors import SarflowError

features_app = typer.Typer(help="Feast feature store: apply, materialize, online get, similarity search, serve.",
                           no_args_is_help=True)

RootOpt = FeaturesRootOpt
RepoOpt = typer.Option(None, "--repo", callback=absolute_path,
                       help="local Feast repo (feature_store.yaml, registry, SQLite online store, materialize state); "
                            "default ROOT/feast, or ./feast-repo/BUCKET/PREFIX for an s3:// root")
OnlineOpt = typer.Option(None, "--online", help="online store: sqlite (embedded default) or redis")
RedisOpt = typer.Option(None, "--redis", help="Redis host:port for --online redis")
RegistryOpt = typer.Option(None, "--registry",
                           help="Feast registry: a database URL (SQL registry, e.g. postgresql+psycopg2://user@host:5432/db) "
                                "or s3://.../registry.pb; default params features.registry, else $SARFLOW_FEAST_REGISTRY, "
                                "else a file in the repo")


def _cfg(params: Optional[Path], root: Optional[str] = None, online: Optional[str] = None,
         redis: Optional[str] = None, repo: Optional[Path] = None, registry: Optional[str] = None, **flags):
    """FeatureConfig: params.yaml's `features:` section, the command's flags on top."""
    return stage_config("features", params, {"root": root, "online": online, "redis": redis,
                                             "repo": str(repo) if repo else None, "registry": registry, **flags})


@features_app.command()
def labels(store: str = typer.Argument(..., callback=absolute_path, help="chip store"), root: Optional[str] = RootOpt,
           params: Optional[Path] = ParamsOpt) -> None:
    """Derive per-chip label features (class fractions, water, tree cover, built-up) from the store."""
    from sarflow.features.labels import chip_labels

    try:
        typer.echo(f"labels written: {chip_labels(store, _cfg(params, root).root)}")
    except SarflowError as e:
        fail(e)


@features_app.command()
def apply(root: Optional[str] = RootOpt, online: Optional[str] = OnlineOpt, redis: Optional[str] = RedisOpt,
          repo: Optional[Path] = RepoOpt, registry: Optional[str] = RegistryOpt, params: Optional[Path] = ParamsOpt) -> None:
    """Register the entity, feature views (one per embedded model version) and services."""
    from sarflow.features.feast_store import apply as run_apply

    try:
        typer.echo(json.dumps(run_apply(_cfg(params, root, online, redis, repo, registry))))
    except SarflowError as e:
        fail(e)


@features_app.command()
def materialize(root: Optional[str] = RootOpt, online: Optional[str] = OnlineOpt, redis: Optional[str] = RedisOpt,
                repo: Optional[Path] = RepoOpt, registry: Optional[str] = RegistryOpt,
                view: Optional[List[str]] = typer.Option(None, help="only these views"),
                batch_rows: Optional[int] = typer.Option(None, help="rows per streamed batch"),
                part: Optional[int] = typer.Option(None, "--part", help="only the PART-th file of each view's source "
                                                                        "(one task per embedding part; all parts = one full run)"),
                state: Optional[str] = typer.Option(None, "--state", help="incremental state location (folder or s3://); "
                                                                          "default repo/materialized, or ROOT/materialized/redis=HOST:PORT/PROJECT"),
                do_apply: bool = typer.Option(True, "--apply/--no-apply", help="apply first (a fan-out applies once, "
                                                                               "before its materialize tasks)"),
                params: Optional[Path] = ParamsOpt) -> None:
    """Apply, then stream new offline rows into the online store (incremental, per source file)."""
    from sarflow.features.feast_store import apply as run_apply
    from sarflow.features.feast_store import materialize as run

    try:
        cfg = _cfg(params, root, online, redis, repo, registry, batch_rows=batch_rows, state=state)
        if do_apply:
            run_apply(cfg)
        typer.echo(json.dumps(run(cfg, views=view, part=part), indent=1))
    except SarflowError as e:
        fail(e)


@features_app.command()
def get(chip_ids: List[str] = typer.Argument(..., help="chip ids"), root: Optional[str] = RootOpt,
        online: Optional[str] = OnlineOpt, redis: Optional[str] = RedisOpt, repo: Optional[Path] = RepoOpt,
        registry: Optional[str] = RegistryOpt,
        feature: Optional[List[str]] = typer.Option(None, help="view:feature (default: newest embeddings)"),
        params: Optional[Path] = ParamsOpt) -> None:
    """Online lookup of features for chips."""
    from sarflow.features.feast_store import newest_embeddings_view, online_features

    try:
        cfg = _cfg(params, root, online, redis, repo, registry)
        feats = feature or [f"{newest_embeddings_view(cfg)}:embedding"]
        df = online_features(cfg, chip_ids, feats)
        typer.echo(df.to_json(orient="records"))
    except SarflowError as e:
        fail(e)


@features_app.command()
def similar(chip_id: str = typer.Argument(..., help="query chip id"),
            k: int = typer.Option(10, "--k", help="how many similar chips"),
            root: Optional[str] = RootOpt, model: Optional[str] = typer.Option(None, "--model", help=EMBEDDINGS_MODEL_HELP),
            version: Optional[str] = VersionOpt, repo: Optional[Path] = RepoOpt,
            params: Optional[Path] = ParamsOpt) -> None:
    """The k most similar chips by cosine similarity, with distances and metadata."""
    from sarflow.features.search import similar as run

    try:
        cfg = _cfg(params, root, repo=repo)
        model, version = embeddings_model(model, version)
        typer.echo(json.dumps(run(cfg.root, chip_id, k, model, version, repo=cfg.repo), indent=1))
    except SarflowError as e:
        fail(e)


@features_app.command()
def serve(root: Optional[str] = RootOpt, online: Optional[str] = OnlineOpt, redis: Optional[str] = RedisOpt,
          repo: Optional[Path] = RepoOpt, registry: Optional[str] = RegistryOpt,
          host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(6566, help="HTTP port to listen on"),
          workers: Optional[int] = typer.Option(None, help="worker processes (default $SARFLOW_FEAST_WORKERS, else one "
                                                           "per two cores)"),
          params: Optional[Path] = ParamsOpt) -> None:
    """Run the Feast feature server (HTTP) over this features root, with the flags `services up`
    and k8s use (no worker recycling, no access log: sarflow.local.services.feast_serve_flags)."""
    from sarflow.features.feast_store import feast_errors, open_feature_store
    from sarflow.local.services import feast_serve_command

    try:
        cfg = _cfg(params, root, online, redis, repo, registry)
        command = feast_serve_command(cfg.repo, host, port, workers)
        with feast_errors(cfg):
            open_feature_store(cfg)
    except SarflowError as e:  # a bad $SARFLOW_FEAST_WORKERS too (ServiceError)
        fail(e)
    except OSError as e:  # the repo folder cannot be written
        fail(SarflowError(f"{cfg.repo}: cannot write the Feast repo ({e.strerror or e}); choose another --repo"))
    os.execv(command[0], command)




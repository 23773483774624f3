"""`sarflow embed`: every chip through a registered encoder into the offline feature source;
fanned out with `--shards A:B` (one part per store shard range) and `--finalize` (publish the parts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import (MODEL_HELP, FeaturesRootOpt, ParamsOpt, TrackingOpt, absolute_path, fail, read_params,
                                stage_config)
from sarflow.errors import InputError, SarflowError


def embed(
    store: str = typer.Argument(..., callback=absolute_path, help="chip store"),
    model: str = typer.Option(..., "--model", help=f"the encoder, a registered {MODEL_HELP}; or runs:/RUN_ID/encoder"),
    root: Optional[str] = FeaturesRootOpt,
    batch_size: Optional[int] = typer.Option(None, help="chips per forward pass"),
    device: Optional[str] = typer.Option(None, help="torch device (default: CUDA when present)"),
    workers: Optional[int] = typer.Option(None, help="chip reader threads when --readers is 0 (default params embed.workers)"),
    readers: Optional[int] = typer.Option(None, help="chip reader processes, each opening the store itself (default "
                                                     "params embed.readers; 0: read in this process)"),
    shards: Optional[str] = typer.Option(None, "--shards", help="A:B: embed only store shards [A, B) into a staged part "
                                                               "(one task per range; publish with --finalize)"),
    finalize: bool = typer.Option(False, "--finalize", help="publish the staged parts of this model version as its "
                                                            "partition (every shard once, else an error)"),
    overwrite: bool = typer.Option(False, help="replace this model version's embeddings"),
    tracking_uri: Optional[str] = TrackingOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Embed every chip with a registered encoder into the Parquet offline source (one partition per model version)."""
    import mlflow

    from sarflow.features.embed import embed_store, finalize_embeddings, parse_shards, resolve_model

    try:
        p = read_params(params)
        cfg = stage_config("embed", p, {"batch_size": batch_size, "device": device, "tracking_uri": tracking_uri,
                                        "workers": workers, "readers": readers})
        features = stage_config("features", p, {"root": root})
        if not str(features.root).startswith("s3://"):
            from sarflow.data.paths import check_output_folder

            check_output_folder(features.root, str(features.root),
                                "choose another --features-root (or params features.root) or make that folder writable, then rerun")
        mlflow.set_tracking_uri(cfg.tracking_uri)
        if finalize:
            if shards:
                raise InputError("sarflow embed", "--finalize publishes every part: it takes no --shards")
            ref = resolve_model(model)
            result = finalize_embeddings(features.root, ref.name, ref.version, overwrite=overwrite)
        else:
            result = embed_store(store, model, features.root, batch_size=cfg.batch_size, overwrite=overwrite,
                                 device=cfg.device, shards=parse_shards(shards) if shards else None,
                                 workers=cfg.workers, readers=cfg.readers)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(result, indent=1))


COMMANDS = [embed]

"""`sarflow llp ...`: learning from label proportions from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from sarflow.cli.common import (EMBEDDINGS_MODEL_HELP, ParamsOpt, TrackingOpt, VersionOpt, absolute_path, embeddings_model,
                                fail, stage_config)
from sarflow.errors import SarflowError

llp_app = typer.Typer(help="Learning from label proportions: bags from polygons + statistics, LLP models, MLflow.",
                      no_args_is_help=True)


def _print_table(rows: list[dict]) -> None:
    cols = ["model", "proportion_mae", "f1_macro", "iou_macro", "pixel_f1_macro", "pixel_iou_macro"]
    typer.echo(f"{'model':<30}{'MAE':>9}{'F1':>8}{'IoU':>8}{'pixF1':>8}{'pixIoU':>8}")
    for r in rows:
        vals = []
        for c in cols[1:]:
            v = r.get(c)
            vals.append("     -  " if v is None or v != v else f"{v:8.4f}")
        typer.echo(f"{str(r['model']):<30}{vals[0]:>9}{''.join(vals[1:])}")


@llp_app.command()
def train(
    store: str = typer.Argument(..., callback=absolute_path, help="chip store (Zarr)"),
    polygons: str = typer.Option(..., "--polygons", callback=absolute_path, help="bag polygons (GeoJSON, GeoPackage, ...)"),
    stats: Optional[str] = typer.Option(None, "--stats", callback=absolute_path, help="CSV: ID, frac_<class>... per polygon"),
    label_raster: Optional[str] = typer.Option(None, "--label-raster", callback=absolute_path, help="aggregate bag proportions from this raster"),
    features_root: Optional[str] = typer.Option(None, "--features-root", callback=absolute_path, help="embeddings; bags are written here"),
    tracking_uri: Optional[str] = TrackingOpt,
    id_column: Optional[str] = typer.Option(None, "--id-column", help="polygon/statistics id column"),
    model: Optional[str] = typer.Option(None, "--model", help=EMBEDDINGS_MODEL_HELP),
    version: Optional[str] = VersionOpt,
    models: Optional[List[str]] = typer.Option(None, "--models", help="LLP models to train (default all)"),
    loss: Optional[str] = typer.Option(None, "--loss", help="kl, mse or ce"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimiser steps per LLP model"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction",
                                                 help="training bags held out to choose the steps (0: train --steps)"),
    classes: Optional[List[int]] = typer.Option(None, "--classes", help="class codes (default: those of the stats, "
                                                "else the label's declared classes)"),
    label: Optional[str] = typer.Option(None, "--label", help="the store's categorical label the proportions are of "
                                        "(default: its only one)"),
    label_nodata: Optional[float] = typer.Option(None, "--label-nodata", help="nodata of --label-raster (default: the "
                                                 "label's declared nodata, else the raster's tag)"),
    modalities: Optional[List[str]] = typer.Option(None, "--modalities", help="input sources of the pixel model "
                                                   "(default: the store's continuous inputs)"),
    split: Optional[str] = typer.Option(None, "--split", help="bags (held-out bags) or store (the store's split)"),
    bag_sizes: Optional[List[int]] = typer.Option(None, "--bag-size", help="merge factors for the bag-size curve"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment"),
    task: Optional[str] = typer.Option(None, "--task", help="registered as sarflow-<task> (default llp-<label>)"),
    register: Optional[bool] = typer.Option(None, "--register/--no-register", help="register the best LLP model "
                                                                                 "as sarflow-<task>"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed"),
    out_dir: Optional[str] = typer.Option(None, "--out", callback=absolute_path, help="folder for the table and plots (default <features-root>/llp)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Bags from polygons x chips, LLP models trained on bag proportions, scored on held-out chips.
    Defaults: params.yaml's `llp:` section; flags override it."""
    from sarflow.downstream.llp.run import run_llp

    try:
        model, version = embeddings_model(model, version, tracking_uri)
        cfg = stage_config("llp", params, {
            "tracking_uri": tracking_uri, "id_column": id_column, "stats": stats, "label_raster": label_raster,
            "features_root": features_root, "model": model, "version": version, "models": models or None, "loss": loss,
            "steps": steps, "lr": lr, "val_fraction": val_fraction, "classes": classes or None, "split": split,
            "truth_modality": label, "label_nodata": label_nodata, "pixel_modalities": modalities or None,
            "bag_sizes": bag_sizes or None, "experiment": experiment, "task": task, "register": register, "seed": seed,
            "out_dir": out_dir}, store=store, polygons=polygons)
        result = run_llp(cfg)
    except SarflowError as e:
        fail(e)
        return
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str))
        return
    _print_table(result["rows"])
    reg = result["registered"]
    typer.echo(f"task: {result['task']}  best: {result['best_model']} ({result['selection']})  features: "
               f"{result['features']}  chips outside every polygon: {result['outside']}")
    typer.echo(f"run: {result['run_id']}  registered: {reg['name']} v{reg['version']}" if reg["name"]
               else f"run: {result['run_id']}  (not registered)")
    typer.echo(f"bags: {result['bags']}\ntable: {result['table']}\nplots: {', '.join(result['plots'])}")


@llp_app.command("real-case")
def real_case(
    real_dir: Path = typer.Argument(..., callback=absolute_path, help="the real-data folder (with sen1floods11/ and admin/)"),
    tracking_uri: Optional[str] = TrackingOpt,
    out_dir: Path = typer.Option(Path("data/llp-real"), "--out", callback=absolute_path, help="folder for the table, plots and bags"),
    grid: int = typer.Option(4, "--grid", help="the county is cut into GRID x GRID bags"),
    chip: int = typer.Option(32, "--chip", help="chip side in pixels"),
    steps: int = typer.Option(300, "--steps", help="optimiser steps per LLP model"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
) -> None:
    """LLP on the real Sen1Floods11 Kansas chip (water vs dry, county FIPS 20121)."""
    from sarflow.downstream.llp.real_case import run_real_case

    try:
        if not real_dir.is_dir():
            from sarflow.errors import InputError

            raise InputError(str(real_dir), "the real-data folder does not exist")
        from sarflow.params import default_tracking_uri

        result = run_real_case(real_dir, tracking_uri or default_tracking_uri(), out_dir, chip=chip, grid=grid, steps=steps, seed=seed)
    except SarflowError as e:
        fail(e)
        return
    _print_table(result["rows"])
    typer.echo(f"best: {result['best_model']}  run: {result['run_id']}\ntable: {result['table']}")

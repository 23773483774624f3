"""The `sarflow` command line: one thin command per stage."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli_common import fail
from sarflow.errors import SarflowError

app = typer.Typer(help="sarflow: SAR + optical Earth-observation data to ML-ready chips and models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOpt = typer.Option(None, "--params", help="params.yaml to read (default: ./params.yaml when present)")


def _tracking_uri(explicit: str | None, params: Path | None) -> str:
    """--tracking-uri, else params.yaml pretrain.tracking_uri, else the embedded default."""
    from sarflow.params import load_params, section

    return explicit or section(load_params(params), "pretrain", {}).get("tracking_uri", "sqlite:///mlflow.db")


def _pretrain_config(p: dict, store: str, overrides: dict):
    """PretrainConfig from params.yaml's `pretrain:` section and the command's flags."""
    from sarflow.training.pretrain import PretrainConfig

    return PretrainConfig.from_params(p.get("pretrain") or {}, store, **overrides)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log more")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU-feature build it tries


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="folder to write the scene into"),
    size: Optional[int] = typer.Option(None, help="scene side in 10 m pixels (up to 10980, a Sentinel-2 tile)"),
    seed: Optional[int] = typer.Option(None, help="random seed; the same seed gives the same bytes"),
    chip_size: Optional[int] = typer.Option(None, help="chip size written into catalog.yaml"),
    cloud_fraction: Optional[float] = typer.Option(None, help="fraction of the S2 scene under cloud"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Generate a synthetic AOI: S1 GRD/coherence/phase, S2 with clouds, labels, municipalities, catalog."""
    from sarflow.params import load_params, section
    from sarflow.synth import SynthConfig, synthesize

    try:
        cfg = section(load_params(params), "synth",
                      {"size_px": size, "seed": seed, "chip_size": chip_size, "cloud_fraction": cloud_fraction})
        catalog = synthesize(out_dir, SynthConfig(**cfg))
    except (SarflowError, ValueError, TypeError) as e:
        fail(e if isinstance(e, SarflowError) else SarflowError(str(e)))
    typer.echo(f"scene written: {catalog}")


@app.command()
def ingest(
    catalog: Path = typer.Argument(..., help="catalog.yaml"),
    out: Optional[Path] = typer.Option(None, help="write the provenance manifest (JSON) here"),
) -> None:
    """Validate every source of a catalog and print (or write) the provenance manifest."""
    from sarflow.catalog import load_catalog
    from sarflow.ingest import ingest as run_ingest

    try:
        manifest = run_ingest(load_catalog(catalog)).manifest()
    except SarflowError as e:
        fail(e)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    if out:
        out.write_text(text)
        typer.echo(f"manifest written: {out}")
    else:
        typer.echo(text)


@app.command()
def tile(
    catalog: Path = typer.Argument(..., help="catalog.yaml"),
    out: Path = typer.Option(..., "--out", help="chip store to write (a .zarr folder)"),
    workers: Optional[int] = typer.Option(None, help="warping threads (default: params or 2)"),
    shard_chips: Optional[int] = typer.Option(None, help="chips per shard file"),
    block_chips: Optional[int] = typer.Option(None, help="chips per side of a warped block"),
    overwrite: bool = typer.Option(False, help="replace an existing store"),
    no_checksum: bool = typer.Option(False, "--no-checksum", help="skip sha256 of the inputs (faster, less provenance)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Align every source onto the grid and write the sharded Zarr v3 chip store (resumes a killed run)."""
    from sarflow.catalog import load_catalog
    from sarflow.params import load_params, section
    from sarflow.tile import TileOptions
    from sarflow.tile import tile as run_tile

    try:
        cfg = section(load_params(params), "tile",
                      {"workers": workers, "shard_chips": shard_chips, "block_chips": block_chips})
        if "split_fractions" in cfg:
            cfg["split_fractions"] = tuple(cfg["split_fractions"])
        options = TileOptions(**cfg, overwrite=overwrite, checksum=not no_checksum)
        store = run_tile(load_catalog(catalog), out, options, show_progress=not quiet and sys.stderr.isatty())
    except SarflowError as e:
        fail(e)
    from sarflow.store import open_store

    typer.echo(f"chip store written: {store} ({open_store(store).n_chips} chips)")


@app.command()
def info(store: Path = typer.Argument(..., help="chip store")) -> None:
    """Summarise a chip store: grid, modalities, chips per split."""
    from sarflow.store import open_store

    try:
        typer.echo(json.dumps(open_store(store).summary(), indent=1))
    except SarflowError as e:
        fail(e)


@app.command()
def version(
    store: Path = typer.Argument(..., help="chip store to version"),
    remote: Optional[str] = typer.Option(None, help="DVC remote URL (s3://bucket/prefix or a folder) to push to"),
    repo: Optional[Path] = typer.Option(None, help="DVC repository root (default: the enclosing one, else the store's folder)"),
) -> None:
    """Version the store with DVC (dvc add + push); prints the dataset version."""
    from sarflow.versioning import version_store

    try:
        v = version_store(store, remote=remote, repo=repo)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(v, indent=1))


@app.command()
def pretrain(
    store: str = typer.Argument(..., help="chip store (folder or s3://)"),
    method: Optional[str] = typer.Option(None, help="mae | dino | clip"),
    max_steps: Optional[int] = typer.Option(None, help="optimisation steps"),
    batch_size: Optional[int] = typer.Option(None),
    vit_size: Optional[str] = typer.Option(None, help="tiny | small | base"),
    patch: Optional[int] = typer.Option(None, help="patch size (8 or 16)"),
    depth: Optional[int] = typer.Option(None, help="override the ViT depth (tiny CPU configs)"),
    dim: Optional[int] = typer.Option(None, help="override the ViT width"),
    output_size: Optional[int] = typer.Option(None, help="resize chips to this side (e.g. 224)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers"),
    devices: Optional[str] = typer.Option(None, help="'auto', a GPU count, or -1 for all GPUs (DDP)"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default sqlite:///mlflow.db)"),
    experiment: Optional[str] = typer.Option(None),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Pretrain a self-supervised encoder (MAE, DINO or CLIP-multimodal), track it in MLflow and
    register it as sarflow-encoder-<method>."""
    from sarflow.params import load_params
    from sarflow.training.pretrain import pretrain as run_pretrain

    try:
        cfg = _pretrain_config(load_params(params), store, {
            "method": method, "batch_size": batch_size, "output_size": output_size, "workers": workers,
            "tracking_uri": tracking_uri, "experiment": experiment,
            "devices": int(devices) if devices and devices.lstrip("-").isdigit() else devices,
            "vit": {"size": vit_size, "patch": patch, "depth": depth, "dim": dim}, "optim": {"max_steps": max_steps}})
        result = run_pretrain(cfg, show_progress=sys.stderr.isatty())
    except SarflowError as e:
        fail(e)
    except (ValueError, TypeError) as e:
        fail(SarflowError(str(e)))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "losses"} |
                          {"first_loss": result["losses"][0], "last_loss": result["losses"][-1]}, indent=1))


@app.command()
def embed(
    store: str = typer.Argument(..., help="chip store"),
    model: str = typer.Option(..., "--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/encoder"),
    root: Path = typer.Option(Path("data/features"), "--root", help="features root (the offline store)"),
    batch_size: int = typer.Option(256),
    overwrite: bool = typer.Option(False, help="replace this model version's embeddings"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: params pretrain.tracking_uri)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Embed every chip with a registered encoder into the Parquet offline source (one partition per model version)."""
    import mlflow

    from sarflow.features.embed import embed_store

    try:
        mlflow.set_tracking_uri(_tracking_uri(tracking_uri, params))
        result = embed_store(store, model, root, batch_size=batch_size, overwrite=overwrite)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(result, indent=1))


@app.command()
def promote(
    name: str = typer.Argument(..., help="registered model, e.g. sarflow-landcover"),
    metric: str = typer.Option(..., help="the evaluation metric logged on each version's run"),
    lower_is_better: bool = typer.Option(False, help="for losses and errors"),
    margin: float = typer.Option(0.0, help="the challenger must beat the champion by more than this"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: params pretrain.tracking_uri)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Gate: move @champion to the newest version only if it is better on the same evaluation set and data."""
    import mlflow

    from sarflow.registry import promote as run_promote

    try:
        mlflow.set_tracking_uri(_tracking_uri(tracking_uri, params))
        d = run_promote(name, metric, higher_is_better=not lower_is_better, margin=margin)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(d.__dict__, indent=1))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), help="output folder (summary.json, store, MLflow, Feast, plots)"),
    catalog: Optional[Path] = typer.Option(None, help="run on your own catalog instead of a synthetic scene"),
    size: Optional[int] = typer.Option(None, help="synthetic scene side in pixels"),
    services: Optional[Path] = typer.Option(None, help="use the servers of `sarflow services up DIR` instead of files"),
    fresh: bool = typer.Option(False, "--fresh", help="remove a previous demo's products from OUT first"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Run the end-to-end pipeline with kfp.local on the embedded default; print where everything is."""
    from sarflow.demo import clean_output, format_report, run_demo
    from sarflow.params import load_params
    from sarflow.services import read_state

    try:
        if fresh:
            clean_output(out)
        summary = run_demo(out, load_params(params), catalog=catalog, size_px=size,
                           services=read_state(services) if services else None)
    except SarflowError as e:
        fail(e)
    typer.echo(format_report(summary))
    typer.echo(f"summary: {Path(out).resolve() / 'summary.json'}")


@app.command()
def results(
    out: Path = typer.Option(Path("demo-output"), help="a finished demo's output folder"),
    real_data: Optional[Path] = typer.Option(Path("../shared/data/real"), "--real-data", envvar="SARFLOW_REAL_DATA",
                                             help="the real-data folder (Kansas LLP case; skipped when absent)"),
) -> None:
    """Every other downstream result on top of a finished demo (segmentation, modality ablation,
    synthetic regions, the real LLP case), gathered into one MLflow results report."""
    import os

    from sarflow.cli_downstream import echo_report
    from sarflow.results import demo_results

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        r = demo_results(out, real_data)
    except SarflowError as e:
        fail(e)
    if not r["real_case"]:
        typer.echo(f"note: {real_data} has no sen1floods11/: the real LLP case is left out of the report")
    echo_report(r)


from sarflow.cli_downstream import downstream_app  # noqa: E402
from sarflow.cli_features import features_app  # noqa: E402
from sarflow.cli_llp import llp_app  # noqa: E402
from sarflow.cli_segment import segment_app  # noqa: E402
from sarflow.cli_pipeline import pipeline_app  # noqa: E402
from sarflow.cli_services import services_app  # noqa: E402

app.add_typer(features_app, name="features")
app.add_typer(downstream_app, name="downstream", help="Probes on frozen embeddings, label-efficiency curves, modality ablation, region generalization.")
app.add_typer(segment_app, name="segment", help="Segmentation: a head on the pretrained ViT vs a U-Net from scratch (mIoU).")
app.add_typer(llp_app, name="llp", help="Learning from label proportions: bags from polygons, chip models from bag statistics.")

app.add_typer(services_app, name="services")
app.add_typer(pipeline_app, name="pipeline", help="Compile, run locally (kfp.local) or submit the Kubeflow pipelines.")

if __name__ == "__main__":
    app()

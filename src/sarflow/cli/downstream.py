"""`sarflow downstream ...`: probes on frozen embeddings, modality ablation, region generalization."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sarflow.cli.common import (EMBEDDINGS_MODEL_HELP, MODEL_HELP, FeaturesRootOpt, ParamsOpt, TrackingOpt, VersionOpt,
                                absolute_path, embeddings_model, fail, read_params, registered_model_uri, stage_config)
from sarflow.errors import InputError, SarflowError

downstream_app = typer.Typer(help="Downstream science on frozen embeddings: probes and label-efficiency curves, "
                                  "modality ablation, region generalization.", no_args_is_help=True)

RootOpt = FeaturesRootOpt
ExpOpt = typer.Option("sarflow-downstream", "--experiment", help="MLflow experiment")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(text, f"{what} must be comma-separated integers (e.g. 25,50,100,0)") from None


@downstream_app.command()
def probe(store: str = typer.Argument(..., callback=absolute_path, help="chip store"), features_root: Optional[Path] = RootOpt,
          tracking_uri: Optional[str] = TrackingOpt,
          model: Optional[str] = typer.Option(None, "--model", help=EMBEDDINGS_MODEL_HELP),
          version: Optional[str] = VersionOpt,
          task: Optional[List[str]] = typer.Option(None, "--task", help="tasks (default: every task the store's labels declare)"),
          modality: Optional[List[str]] = typer.Option(None, "--modality",
                                                       help="inputs of the pixel baselines (default: every input source)"),
          sizes: Optional[str] = typer.Option(None, help="label budgets, comma-separated; 0 = all (default params)"),
          draws: Optional[int] = typer.Option(None, help="random draws per label budget"),
          baseline: Optional[List[str]] = typer.Option(None, "--baseline", help="pixel_stats, random_init, scratch (default all)"),
          no_baselines: bool = typer.Option(False, "--no-baselines", help="embeddings only"),
          scratch_steps: Optional[int] = typer.Option(None, help="optimiser steps of the from-scratch CNN at every n "
                                                                 "(early-stopped on val)"),
          register: Optional[bool] = typer.Option(None, "--register/--no-register", help="register the best probe per task"),
          out_dir: Optional[Path] = typer.Option(None, "--out", "--out-dir", callback=absolute_path,
                                                 help="folder for plots and tables (default: a temp folder)"),
          experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment"),
          seed: Optional[int] = typer.Option(None, help="random seed (default params downstream.seed)"),
          params: Optional[Path] = ParamsOpt) -> None:
    """Label-efficiency curves of probes on frozen embeddings vs baselines; registers the best probe per task."""
    from sarflow.downstream.probes import run_probes

    try:
        p = read_params(params)
        root = str(features_root) if features_root else stage_config("features", p).root
        model, version = embeddings_model(model, version, tracking_uri)
        cfg = stage_config("downstream", p, {
            "tracking_uri": tracking_uri, "model": model, "version": version, "tasks": task or None,
            "modalities": modality or None,
            "sizes": _ints(sizes, "--sizes") if sizes else None, "draws": draws,
            "baselines": () if no_baselines else (baseline or None), "scratch_steps": scratch_steps,
            "register": register, "out_dir": str(out_dir) if out_dir else None, "experiment": experiment, "seed": seed},
            store=store, features_root=root)
        r = run_probes(cfg)
    except SarflowError as e:
        fail(e)
    from sarflow.downstream.label_efficiency import format_figure, format_saving

    typer.echo("test score with every train label, 95% interval over spatial test blocks "
               "(the registered probe; baselines beside it)")
    for t, info in r["tasks"].items():
        f = r["primary"][t]
        typer.echo(f"{t}: {info['metric']} ({'higher' if f['higher_is_better'] else 'lower'} is better) "
                   f"embeddings[{f['probe']}] {format_figure(f['value'], f['ci'])}  "
                   f"(n={f['n']}, {r['intervals'][t]['blocks']} test blocks of {r['intervals'][t]['block_chips']} chips)")
        for b, v in f["baselines"].items():
            saving = r["label_savings"].get(t, {}).get(b)
            typer.echo(f"  {b + ' [' + v['probe'] + ']':<22} {format_figure(v['value'], v['ci']):<28}"
                       f" label saving: {format_saving(saving) if saving else '–'}")
        if not info["selection"].startswith("best on val"):
            typer.echo(f"  {t}: {info['selection']}")
    for t, why in r["not_evaluable"].items():
        typer.echo(f"not evaluable: {t}: {why} (not registered)")
    for b, why in r["baselines_left_out"].items():
        typer.echo(f"baseline left out: {b}: {why}")
    if r["models"]:
        typer.echo("registered: " + ", ".join(f"{k} v{v['version']}" for k, v in r["models"].items()))
    typer.echo(f"mlflow run: {r['run_id']}")
    typer.echo(f"json: {r['json']}")


@downstream_app.command()
def ablation(clear: Optional[str] = typer.Option(None, callback=absolute_path, help="chip store of a clear scene"),
             clouded: Optional[str] = typer.Option(None, callback=absolute_path, help="chip store of a clouded scene"),
             synth: Optional[Path] = typer.Option(None, callback=absolute_path, help="synthesize a clear and a clouded scene here instead"),
             cloud_fraction: float = typer.Option(0.6, help="cloud cover of the synthesized clouded scene"),
             size_px: int = typer.Option(384, help="side of the synthesized scenes"),
             encoder: Optional[str] = typer.Option(None, help=f"multimodal encoder, a registered {MODEL_HELP} "
                                                              "(e.g. sarflow-encoder-clip); default raw-pixel statistics"),
             probe_name: str = typer.Option("linear", "--probe", help="linear, knn or mlp"),
             tracking_uri: Optional[str] = TrackingOpt, experiment: str = ExpOpt,
             out_dir: Optional[Path] = typer.Option(None, "--out", "--out-dir", callback=absolute_path,
                                                    help="folder for the table (default: a temp folder)")) -> None:
    """SAR-only vs optical-only vs fused features under clear and clouded skies."""
    from sarflow.downstream.ablation import run_ablation
    from sarflow.downstream.synthetic_stores import synth_ablation_stores

    try:
        if synth is not None:
            stores = synth_ablation_stores(synth, size_px=size_px, clouded=cloud_fraction)
        else:
            stores = {k: v for k, v in (("clear", clear), ("clouded", clouded)) if v}
            if not stores:
                raise InputError("ablation", "give --clear and/or --clouded stores, or --synth DIR")
        r = run_ablation(stores, tracking_uri, encoder_uri=registered_model_uri(encoder, tracking_uri), probe=probe_name,
                         experiment=experiment,
                         out_dir=str(out_dir) if out_dir else None)
    except SarflowError as e:
        fail(e)
    cols = r["columns"]
    width = max([22] + [len(c) + 2 for c in cols])
    typer.echo(f"{'condition':<10}{'modalities':<11}" + "".join(f"{c:>{width}}" for c in cols)
               + f"   features: {r['features']}")
    for row in r["rows"]:
        typer.echo(f"{row['condition']:<10}{row['modalities']:<11}" + "".join(f"{row[c]:>{width}.4f}" for c in cols))
    for line in r["skipped_sets"]:
        typer.echo(f"skipped: {line}")
    for k, why in r["not_evaluable"].items():
        typer.echo(f"not evaluable: {k}: {why}")
    typer.echo(f"json: {r['json']}")


@downstream_app.command()
def region(store: Optional[str] = typer.Argument(None, callback=absolute_path, help="chip store: its two halves are the regions, or region A "
                                                            "with --other"),
           features_root: Optional[Path] = RootOpt, tracking_uri: Optional[str] = TrackingOpt,
           model: Optional[str] = typer.Option(None, "--model", help=EMBEDDINGS_MODEL_HELP),
           version: Optional[str] = VersionOpt,
           task: Optional[List[str]] = typer.Option(None, "--task", help="tasks (default: every task the store's labels declare)"),
           axis: str = typer.Option("x", help="halves of STORE; x: west/east, y: south/north"),
           other: Optional[str] = typer.Option(None, "--other", callback=absolute_path, help="a second chip store: region B"),
           other_features_root: Optional[Path] = typer.Option(None, "--other-features-root", callback=absolute_path,
                                                              help="features root of --other (default --features-root)"),
           synth: Optional[Path] = typer.Option(None, callback=absolute_path, help="synthesize regions A, B_same and B_shifted here instead of STORE"),
           shift: float = typer.Option(2.0, help="B_shifted's class mix: built-up and water x (1 + S), trees / (1 + S)"),
           size_px: int = typer.Option(512, help="side of the synthesized scenes"),
           encoder: Optional[str] = typer.Option(None, help=f"with --synth: multimodal encoder, a registered {MODEL_HELP}; "
                                                            "default raw-pixel statistics"),
           probe_name: str = typer.Option("linear", "--probe", help="linear, knn or mlp"), experiment: str = ExpOpt,
           out_dir: Optional[Path] = typer.Option(None, "--out", "--out-dir", callback=absolute_path,
                                                  help="folder for the table (default: a temp folder)")) -> None:
    """Train in one region, test in-region and out-of-region, both ways; error gap next to MMD and mean-embedding distance."""
    from sarflow.downstream.region import SYNTH_REGION_PAIRS, run_region_generalization, run_region_stores
    from sarflow.downstream.synthetic_stores import synth_region_stores

    tasks = tuple(task or ())
    out = str(out_dir) if out_dir else None
    try:
        if synth is not None:
            if store or other:
                raise InputError(str(synth), "give STORE (and --other) or --synth DIR, not both")
            stores = synth_region_stores(synth, size_px=size_px, shift=shift)
            r = run_region_stores(stores, SYNTH_REGION_PAIRS, encoder_uri=registered_model_uri(encoder, tracking_uri),
                                  tasks=tasks, probe=probe_name,
                                  tracking_uri=tracking_uri, experiment=experiment, out_dir=out)
        elif store is None:
            raise InputError("region", "give a chip STORE (its halves, or region A with --other STORE), or --synth DIR")
        else:
            root = str(features_root) if features_root else stage_config("features", None).root
            model, version = embeddings_model(model, version, tracking_uri)
            r = run_region_generalization(store, root, tracking_uri, model=model, version=version,
                                          tasks=tasks, probe=probe_name, axis=axis, experiment=experiment, out_dir=out,
                                          other=other, other_features_root=str(other_features_root) if other_features_root else None)
    except SarflowError as e:
        fail(e)
    tw = max([12] + [len(row["task"]) + 2 for row in r["rows"]])
    typer.echo(f"{'train':<11}{'target':<11}{'task':<{tw}}{'metric':<10}{'in':>8}{'out':>8}{'err gap':>9}{'MMD2':>9}"
               f"{'p':>7}{'mean d':>8}")
    for row in r["rows"]:
        typer.echo(f"{row['train']:<11}{row['test_out']:<11}{row['task']:<{tw}}{row['metric']:<10}{row['in_region']:>8.3f}"
                   f"{row['out_region']:>8.3f}{row['error_gap']:>9.3f}{row['mmd2']:>9.4f}{row['mmd_pvalue']:>7.3f}"
                   f"{row['mean_distance']:>8.2f}")
    for k, why in r["not_evaluable"].items():
        typer.echo(f"not evaluable: {k}: {why}")
    typer.echo(f"json: {r['json']}")



@downstream_app.command()
def report(tracking_uri: Optional[str] = TrackingOpt,
           experiment_filter: Optional[List[str]] = typer.Option(None, "--from-experiment",
                                                                 help="look for source runs only here (default: all)"),
           experiment: str = typer.Option("sarflow-reports", "--experiment", help="MLflow experiment of the report run"),
           strict: bool = typer.Option(False, "--strict", help="fail, writing nothing, while a section was never run"),
           out_dir: Optional[Path] = typer.Option(None, "--out", "--out-dir", callback=absolute_path,
                                                  help="folder for report.md/report.html (default: a temp folder)")) -> None:
    """One MLflow run gathering every result table and plot: label efficiency, modality ablation,
    region generalization, segmentation, LLP (synthetic and real)."""
    import os

    from sarflow.downstream.results_report import build_results_report
    from sarflow.params import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per section instead
    try:
        r = build_results_report(tracking_uri, experiments=experiment_filter, experiment=experiment,
                                 out_dir=str(out_dir) if out_dir else None, strict=strict)
    except SarflowError as e:
        fail(e)
    echo_report(r)


def echo_report(r: dict) -> None:
    """The sections of a results report (their source runs, or how to make them) and where it is."""
    from sarflow.downstream.results_report import SECTIONS

    for s in SECTIONS:
        if s.key not in r["sections"]:
            continue
        runs = r["sections"][s.key]
        typer.echo(f"{s.key:<22}" + (", ".join(runs) if runs else f"not run yet ({s.command})"))
    typer.echo(f"mlflow run: {r['run_id']}")
    typer.echo(f"report: {r['markdown']}")
    typer.echo(f"html: {r['html']}")


if __name__ == "__main__":  # pragma: no cover
    downstream_app()

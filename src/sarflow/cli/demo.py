"""`sarflow demo | results`: the end-to-end pipeline on this machine, and every result on top of it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sarflow.cli.common import ParamsOpt, absolute_path, check_params, fail, read_params, verbose_logging
from sarflow.errors import SarflowError
from sarflow.local.results import RESULT_SECTIONS


def demo(
    out: Path = typer.Option(Path("demo-output"), callback=absolute_path,
                             help="output folder (summary.json, store, MLflow, Feast, plots)"),
    catalog: Optional[Path] = typer.Option(None, callback=absolute_path, help="run on your own catalog instead of a synthetic scene"),
    size: Optional[int] = typer.Option(None, help="synthetic scene side in pixels"),
    services: Optional[Path] = typer.Option(None, callback=absolute_path,
                                            help="use the servers of `sarflow services up DIR` instead of files"),
    fresh: bool = typer.Option(False, "--fresh", help="remove a previous demo's products from OUT first"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="the full KFP output on the terminal (it is always in "
                                 "OUT/logs/<task>.log)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Run the end-to-end pipeline with kfp.local on the embedded default: one line per task, each
    task's log in OUT/logs/, the report at the end."""
    import pipelines
    from sarflow.local.demo import clean_output, format_report, run_demo
    from sarflow.local.services import read_state

    try:
        p = read_params(params)
        check_params(p)
        if fresh:
            clean_output(out)
        summary = run_demo(out, pipelines.demo_pipeline(on_catalog=catalog is not None), p,
                           catalog=catalog, size_px=size,
                           services=read_state(services) if services else None, verbose=verbose or verbose_logging())
    except SarflowError as e:
        fail(e)
    typer.echo(format_report(summary))
    typer.echo(f"summary: {Path(out).resolve() / 'summary.json'}")


def results(
    out: Path = typer.Option(Path("demo-output"), callback=absolute_path, help="a finished demo's output folder"),
    real_data: Optional[Path] = typer.Option(Path("../shared/data/real"), "--real-data", envvar="SARFLOW_REAL_DATA",
                                             callback=absolute_path,
                                             help="the real-data folder (Kansas LLP case; skipped when absent)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only this section again (repeatable: "
                                             f"{', '.join(RESULT_SECTIONS)}); "
                                             "the report still shows the newest run of every section"),
) -> None:
    """Every other downstream result on top of a finished demo (segmentation, modality ablation,
    synthetic regions, the real LLP case), gathered into one MLflow results report."""
    import os

    from sarflow.cli.downstream import echo_report
    from sarflow.local.results import demo_results

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        r = demo_results(out, real_data, only=only or None)
    except SarflowError as e:
        fail(e)
    if r["real_case_left_out"]:
        typer.echo(f"note: {real_data} has no sen1floods11/: the real LLP case is left out of the report")
    echo_report(r)


COMMANDS = [demo, results]

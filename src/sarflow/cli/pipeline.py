"""`sarflow pipeline ...`: compile, run locally, or submit the Kubeflow pipelines.

A typer sub-app; the main CLI registers it with ``app.add_typer(pipeline_app, name="pipeline")``.
Pipeline arguments come from ``params.yaml`` (the keys of the pipeline's sections, its
module's ``PARAMS_SECTIONS``: a section named like a parameter is passed whole, the keys of
the others name parameters: for ``data``, ``synth.size_px`` -> ``size_px``,
``tile.shard_chips`` -> ``shard_chips``; a key that names none is refused), and
``--arg KEY=VALUE`` overrides them (VALUE is read as JSON when it parses: ``seeds=[0,1]``,
``size_px=256``, ``checksum=false``; otherwise it is a string).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from sarflow.cli.common import ParamsOpt, absolute_path, check_params, fail, read_params, verbose_logging
from sarflow.errors import SarflowError

pipeline_app = typer.Typer(
    help="Kubeflow pipelines: compile to IR YAML, run locally with kfp.local, submit to a KFP server.",
    no_args_is_help=True, pretty_exceptions_enable=False)

NameArg = typer.Argument("data", help="pipeline: a short name (data) or module:function")
ArgOpt = typer.Option(None, "--arg", "-a", help="pipeline argument KEY=VALUE (VALUE as JSON when it parses); repeatable")

# pipeline parameters that name a local path (or an s3:// URI) on the machine that runs the tasks:
# for a local run (`run --local`) made absolute against the working directory, like any other path
# a command takes; a compiled or submitted pipeline's paths are the cluster's, left as given
LOCAL_PATH_ARGS = ("features_root", "dvc_remote", "scene_uri", "store_uri", "bags_uri", "failure_log")


def parse_arguments(pairs: List[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SarflowError(f"--arg {pair!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def _arguments(pipeline, params: Optional[Path], pairs: List[str] | None, local: bool = False) -> dict[str, Any]:
    """The pipeline's arguments: params.yaml, then --arg; for a `local` run, paths made absolute."""
    from components.paths import absolute, absolute_uri
    from sarflow.mlops.kfp_runner import arguments_from_params

    p = read_params(params, resolve=local)
    check_params(p)  # every section through its stage config: a bad key fails here, not in a task
    args = arguments_from_params(pipeline, p)
    args.update(parse_arguments(pairs))
    if local:
        for key in LOCAL_PATH_ARGS:
            if isinstance(args.get(key), str):
                args[key] = absolute(args[key])
        if isinstance(args.get("tracking_uri"), str):
            args["tracking_uri"] = absolute_uri(args["tracking_uri"])
    return args


@pipeline_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="as JSON {pipeline: {parameter: default}}")) -> None:
    """List the pipelines and their parameters with defaults."""
    import pipelines
    from sarflow.mlops.kfp_runner import pipeline_parameters

    try:
        listed = {n: pipeline_parameters(pipelines.load(n)) for n in pipelines.names()}
    except SarflowError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(listed, indent=1, default=str))
        return
    for name, parameters in listed.items():
        typer.echo(f"{name}:")
        for k, v in parameters.items():
            typer.echo(f"  {k} = {json.dumps(v, default=str) if v is not None else '(required)'}")


@pipeline_app.command("compile")
def compile_cmd(
    name: str = NameArg,
    out: Optional[Path] = typer.Option(None, "--out", "-o", callback=absolute_path,
                                       help="IR YAML to write (default: <name>_pipeline.yaml)"),
    arg: Optional[List[str]] = ArgOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Compile a pipeline to KFP IR YAML; params.yaml and --arg become its parameter defaults."""
    import pipelines
    from sarflow.mlops.kfp_runner import compile_pipeline

    try:
        pipeline = pipelines.load(name)
        path = compile_pipeline(pipeline, out or Path(f"{name.split(':')[-1]}_pipeline.yaml"),
                                defaults=_arguments(pipeline, params, arg))
    except SarflowError as e:
        fail(e)
    typer.echo(f"pipeline compiled: {path}")


@pipeline_app.command("run")
def run_cmd(
    name: str = NameArg,
    local: bool = typer.Option(False, "--local", help="run here with kfp.local (SubprocessRunner, use_venv=False)"),
    pipeline_root: Path = typer.Option(Path("data/kfp-local"), callback=absolute_path,
                                       help="folder for the run's outputs (one subfolder per run)"),
    arg: Optional[List[str]] = ArgOpt,
    params: Optional[Path] = ParamsOpt,
    cache: bool = typer.Option(False, "--cache/--no-cache", help="reuse outputs of tasks already run with the same inputs"),
    summary: Optional[Path] = typer.Option(None, callback=absolute_path, help="also write the run summary (JSON) here"),
    services: Optional[Path] = typer.Option(None, callback=absolute_path, help="target the servers of `sarflow services up DIR` "
                                            "(MLflow server, S3, Redis) instead of the embedded default"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="the full KFP output on the terminal (it is always in "
                                 "PIPELINE_ROOT/logs/<run>/<task>.log)"),
) -> None:
    """Run a pipeline on this machine (--local): one line per task, each task's log in
    PIPELINE_ROOT/logs/; prints where the stores and versions are."""
    if not local:
        fail(SarflowError("`run` runs pipelines locally: pass --local, or use `sarflow pipeline submit --host URL`"))
    import pipelines
    from sarflow.local.services import pipeline_arguments, read_state
    from sarflow.params import environ
    from sarflow.mlops.console import run_report
    from sarflow.mlops.kfp_runner import pipeline_parameters, run_local

    try:
        pipeline = pipelines.load(name)
        args, env = {}, {}
        if services:
            state = read_state(services)
            inputs = pipeline_parameters(pipeline)
            args, env = {k: v for k, v in pipeline_arguments(state).items() if k in inputs}, state["env"]
        args.update(_arguments(pipeline, params, arg, local=True))
        log_dir = pipeline_root / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with environ(env):
            result = run_local(pipeline, pipeline_root, enable_caching=cache, log_dir=log_dir,
                               verbose=verbose or verbose_logging(), **args)
    except SarflowError as e:
        fail(e)
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.summary(), indent=1, default=str))
    typer.echo(run_report(result.summary(), log_dir))
    if summary:
        typer.echo(f"  summary (JSON): {summary}")


@pipeline_app.command("submit")
def submit_cmd(
    name: str = NameArg,
    host: str = typer.Option(..., "--host", help="KFP API server URL, e.g. http://ml-pipeline.kubeflow:8888"),
    arg: Optional[List[str]] = ArgOpt,
    params: Optional[Path] = ParamsOpt,
    experiment: Optional[str] = typer.Option(None, help="experiment name (created when missing)"),
    run_name: Optional[str] = typer.Option(None, help="run name"),
    namespace: Optional[str] = typer.Option(None, help="Kubernetes namespace (multi-user Kubeflow)"),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="override the tasks' caching options"),
) -> None:
    """Submit a pipeline run to a Kubeflow Pipelines server; prints the run id and URL."""
    import pipelines
    from sarflow.mlops.kfp_runner import submit

    try:
        pipeline = pipelines.load(name)
        result = submit(host, pipeline, experiment=experiment, run_name=run_name, namespace=namespace,
                        enable_caching=cache, **_arguments(pipeline, params, arg))
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(result, indent=1))

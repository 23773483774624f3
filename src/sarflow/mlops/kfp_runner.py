"""Kubeflow Pipelines from Python: compile a pipeline to IR YAML, run it locally, submit it.

Every function takes the ``@dsl.pipeline`` object itself: the pipelines live in the project's
top-level ``pipelines/`` package (an installed package, like ``components/``), which the doors
(the CLI, the demo's command) import and resolve by short name (``pipelines.load("data")``);
the library never imports them.

- :func:`compile_pipeline` writes the IR YAML (``kfp.compiler.Compiler``), Kubernetes
  platform config (secrets, ...) included;
- :func:`run_local` runs it with ``kfp.local`` and ``SubprocessRunner(use_venv=False)``:
  every task is a subprocess of the current interpreter, so the tasks import the installed
  ``sarflow`` and nothing is installed or downloaded. kfp.local ignores the Kubernetes
  platform config and resource limits (see ``pipelines/data.py``);
- :func:`submit` sends it to a Kubeflow Pipelines API server (``kfp.Client``).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarflow.errors import SarflowError


class PipelineError(SarflowError):
    """A pipeline could not be found, compiled, run or submitted."""


def pipeline_name(pipeline) -> str:
    """The name a user gave the pipeline (``pipelines.load`` records it as ``short_name``),
    else the one it was declared with (``@dsl.pipeline(name=...)``)."""
    return getattr(pipeline, "short_name", None) or pipeline.name


def _check_pipeline(pipeline) -> None:
    if not hasattr(pipeline, "pipeline_spec"):
        raise PipelineError(f"{pipeline!r} is not a @dsl.pipeline")


def pipeline_parameters(pipeline) -> dict[str, Any]:
    """The pipeline's input parameters and their defaults (None when it has none)."""
    _check_pipeline(pipeline)
    spec = pipeline.component_spec
    return {k: getattr(v, "default", None) for k, v in (spec.inputs or {}).items()}


def _pipeline_module(pipeline):
    return sys.modules.get(getattr(pipeline, "pipeline_func", pipeline).__module__)


def _function_name(pipeline) -> str:
    return getattr(getattr(pipeline, "pipeline_func", None), "__name__", "")


def params_sections(pipeline) -> tuple[str, ...] | None:
    """The params.yaml sections a pipeline reads: its module's PARAMS_SECTIONS, a tuple, or a
    mapping from pipeline function name to a tuple (None: all sections)."""
    sections = getattr(_pipeline_module(pipeline), "PARAMS_SECTIONS", None)
    if isinstance(sections, dict):
        sections = sections.get(_function_name(pipeline))
    return tuple(sections) if sections is not None else None


def arguments_from_params(pipeline, params: dict) -> dict[str, Any]:
    """Pipeline arguments from a params.yaml mapping, section by section (the pipeline's
    ``PARAMS_SECTIONS``, in order, later ones win): a section named like a pipeline input is
    passed whole as that (dict) argument (``pretrain:`` -> ``pretrain``); otherwise each of its
    keys names an input (``synth.size_px`` -> ``size_px``). A key that names no input is an
    error (nothing is dropped silently) unless the module's ``PARAMS_NOT_ARGUMENTS`` lists it
    (``section.key`` -> why); a null value means the pipeline's default."""
    inputs = pipeline_parameters(pipeline)
    wanted = params_sections(pipeline)
    skipped = getattr(_pipeline_module(pipeline), "PARAMS_NOT_ARGUMENTS", {})
    out: dict[str, Any] = {}
    for key in wanted if wanted is not None else list(params):
        section = params.get(key)
        if not isinstance(section, dict):
            continue
        if key in inputs:
            out[key] = _without_none(section)  # KFP cannot encode null; absent means the default
            continue
        unknown = sorted(k for k in section if k not in inputs and f"{key}.{k}" not in skipped)
        if unknown and wanted is not None:
            raise PipelineError(f"{getattr(params, 'source', 'params')}: {key}.{unknown[0]}: pipeline "
                                f"{pipeline_name(pipeline)!r} has no parameter {unknown[0]!r}; it takes {sorted(inputs)}")
        out.update({k: v for k, v in section.items() if k in inputs and v is not None})
    return out


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _check_arguments(pipeline, args: dict) -> None:
    known = pipeline_parameters(pipeline)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise PipelineError(f"pipeline {pipeline_name(pipeline)!r} has no parameter(s) {unknown}; it takes {sorted(known)}")


def compile_pipeline(pipeline, out_path: str | Path, defaults: dict | None = None) -> Path:
    """Compiles a pipeline to KFP IR YAML at `out_path` (written whole, then renamed);
    `defaults` replace the default values of pipeline parameters in the compiled spec."""
    from kfp import compiler

    _check_arguments(pipeline, defaults or {})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.yaml")
    try:
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(tmp), pipeline_parameters=defaults or None)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@dataclass
class LocalRun:
    """What a local run left: its folder under the pipeline root and the files in it."""

    pipeline: str
    pipeline_root: Path
    run_dir: Path | None
    seconds: float
    outputs: Any = None
    tasks: dict[str, Path] = field(default_factory=dict)  # task folder name -> folder

    def files(self, name: str) -> list[Path]:
        """Every task output called `name` (e.g. "store", "version") in this run: a file or
        folder beside a task's executor_output.json."""
        if self.run_dir is None:
            return []
        return sorted(p for p in self.run_dir.rglob(name)
                      if p.name == name and (p.parent / "executor_output.json").is_file())

    def records(self, name: str) -> list[dict]:
        """The JSON content of every file output called `name` in this run."""
        return [json.loads(p.read_text()) for p in self.files(name) if p.is_file()]

    @property
    def versions(self) -> list[dict]:
        """The dataset versions the run's `version` outputs hold (one per chip store)."""
        return self.records("version")

    @property
    def status(self) -> list[dict]:
        """The exit handler's records (`report` outputs): state, failed task, error."""
        return self.records("report")

    @property
    def state(self) -> str | None:
        """SUCCEEDED / FAILED as the exit handler saw it (None when the pipeline has none)."""
        states = {r.get("state") for r in self.status}
        return "FAILED" if "FAILED" in states else (states.pop() if len(states) == 1 else None)

    def summary(self) -> dict:
        versions = self.versions
        # a task served from the cache points at the folder of the run that built it
        stores = {str(p) for p in self.files("store") if p.is_dir()} | {v["store"] for v in versions if "store" in v}
        return {
            "pipeline": self.pipeline,
            "pipeline_root": str(self.pipeline_root),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "state": self.state,
            "seconds": round(self.seconds, 2),
            "tasks": sorted(self.tasks),
            "stores": sorted(stores),
            "versions": versions,
            "status": self.status,
        }


def run_local(pipeline, pipeline_root: str | Path, *, enable_caching: bool = False,
              raise_on_error: bool = True, log_dir: str | Path | None = None, verbose: bool = False,
              **args) -> LocalRun:
    """Runs a pipeline with kfp.local (SubprocessRunner(use_venv=False)) under `pipeline_root`.

    Tasks run as subprocesses of this interpreter (so they import the installed sarflow);
    each run gets its own folder `<pipeline_root>/<pipeline-name>-<timestamp>/`, one
    subfolder per task (ParallelFor iterations are `<task>-iteration-<i>`). With `log_dir`, the
    terminal gets one line per task start and end (`sarflow.mlops.console`) and every task's
    full output goes to `<log_dir>/<task>.log` (`verbose`: the terminal gets it all too)."""
    import contextlib

    from kfp import local

    from sarflow.mlops.console import TaskConsole, count_tasks

    _check_arguments(pipeline, args)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=raise_on_error, enable_caching=enable_caching)
    # tasks get their tracking URI as an argument; an experiment id that mlflow.set_experiment left in
    # this process's environment (for subprocesses) belongs to another tracking store: not theirs
    leaked = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    t0 = time.perf_counter()
    console = TaskConsole(log_dir, count_tasks(pipeline), verbose) if log_dir is not None else None
    # kfp.local swaps the root logger's handlers and level and `builtins.print` (an indenting one) per
    # task and restores what it saw; across ParallelFor threads those swaps interleave and can leave
    # a task's handler or indenting print in place for the rest of the process: restored after the run
    callers = (list(logging.getLogger().handlers), logging.getLogger().level, builtins.print)
    with warnings.catch_warnings():  # the project image's name has no "python" in it: kfp warns
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # resources and display names only mean something on a cluster (documented in pipelines/)
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            with contextlib.redirect_stdout(console) if console else contextlib.nullcontext():
                outputs = pipeline(**args)
        except RuntimeError as e:
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # kfp colours task names
            where = f"; its full log: {console.failed[1]}" if console and console.failed else ""
            raise PipelineError(f"local run of pipeline {pipeline_name(pipeline)!r} under {root} failed: {plain}{where}") from None
        finally:
            if console:
                console.close()
            root_logger = logging.getLogger()
            root_logger.handlers[:], builtins.print = callers[0], callers[2]
            root_logger.setLevel(callers[1])
            if leaked is not None:
                os.environ["MLFLOW_EXPERIMENT_ID"] = leaked
    seconds = time.perf_counter() - t0
    logs_top = (root / Path(log_dir).resolve().relative_to(root).parts[0]) if log_dir is not None and \
        Path(log_dir).resolve().is_relative_to(root) else None  # the task logs may live under the root: not a run
    new = sorted((p for p in root.iterdir() if p.is_dir() and p.name not in before and not p.name.startswith(".")
                  and p != logs_top), key=lambda p: p.stat().st_mtime)
    run_dir = new[-1] if new else None
    tasks = {p.name: p for p in run_dir.iterdir() if p.is_dir()} if run_dir else {}
    return LocalRun(pipeline=pipeline_name(pipeline), pipeline_root=root, run_dir=run_dir, seconds=seconds,
                    outputs=outputs, tasks=tasks)


def submit(host: str, pipeline, *, experiment: str | None = None, run_name: str | None = None,
           namespace: str | None = None, enable_caching: bool | None = None, **args) -> dict:
    """Submits a pipeline run to the KFP API server at `host`; returns the run id and URL.

    Authentication follows kfp.Client (in-cluster service account token, or the
    KF_PIPELINES_* environment); the MinIO keys reach the tasks from the `sarflow-minio`
    Kubernetes secret, never from here."""
    import kfp

    _check_arguments(pipeline, args)
    try:
        client = kfp.Client(host=host, namespace=namespace)
        result = client.create_run_from_pipeline_func(
            pipeline, arguments=args, run_name=run_name, experiment_name=experiment, namespace=namespace,
            enable_caching=enable_caching)
    except Exception as e:  # noqa: BLE001 - kfp/urllib3/kfp_server_api raise many kinds
        msg = str(e).strip().splitlines()
        raise PipelineError(f"cannot submit pipeline {pipeline_name(pipeline)!r} to {host}: {type(e).__name__}: "
                            f"{msg[-1] if msg else ''}") from None
    return {"run_id": result.run_id, "host": host, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}

"""Kubeflow pipelines of sarflow, each a module with a ``@dsl.pipeline`` function.

``REGISTRY`` maps the short names the CLI accepts to ``module:function``; :func:`load` turns a
short name (or ``module:function``) into the pipeline object that :mod:`sarflow.mlops.kfp_runner`
compiles, runs locally or submits.
"""

import importlib

REGISTRY = {
    "data": "pipelines.data:data_pipeline",
    "training": "pipelines.training:training_pipeline",
    "e2e": "pipelines.e2e:e2e_pipeline",
    "e2e-catalog": "pipelines.e2e:e2e_catalog_pipeline",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def load(name: str):
    """The ``@dsl.pipeline`` object for a short name (``data``) or ``module:function``; its
    ``short_name`` is what errors and run summaries call it."""
    from sarflow.mlops.kfp_runner import PipelineError

    given = name
    if ":" not in name:
        if name not in REGISTRY:
            raise PipelineError(f"unknown pipeline {name!r}: choose from {names()} or give module:function")
        name = REGISTRY[name]
    module, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        raise PipelineError(f"cannot import {module!r} for pipeline {name!r}: {e}") from None
    except AttributeError:
        raise PipelineError(f"{module} has no pipeline {attr!r}") from None
    if not hasattr(obj, "pipeline_spec"):
        raise PipelineError(f"{name} is not a @dsl.pipeline")
    obj.short_name = given
    return obj


def demo_pipeline(on_catalog: bool):
    """The pipeline `sarflow demo` runs: end to end on a synthetic scene, or on your catalog."""
    return load("e2e-catalog" if on_catalog else "e2e")

"""Kubeflow pipelines of sarflow, each a module with a ``@dsl.pipeline`` function.

``REGISTRY`` maps the short names the CLI and :mod:`sarflow.kfp_runner` accept to
``module:function``.
"""

REGISTRY = {
    "data": "pipelines.data:data_pipeline",
    "training": "pipelines.training:training_pipeline",
    "e2e": "pipelines.e2e:e2e_pipeline",
    "e2e-catalog": "pipelines.e2e:e2e_catalog_pipeline",
}

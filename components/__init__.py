"""Kubeflow components of sarflow: one module per stage, each a thin wrapper over the library.

Every component is a KFP *lightweight Python component*: the function body is shipped as
source and runs inside the project image ``ghcr.io/sarflow/sarflow:0.1.0`` (on a cluster; the GPU
tasks, pretraining and embedding, in ``ghcr.io/sarflow/sarflow-gpu:0.1.0``) or
in the current interpreter (``kfp.local.SubprocessRunner(use_venv=False)``). Hence:

- all imports (``sarflow`` included) live inside the function bodies; the module level of
  these files is never executed by the task;
- ``packages_to_install`` is left empty and ``install_kfp_package=False``: the image (and the
  project venv) already has ``kfp`` and ``sarflow``, so no task reaches a package index;
- inputs and outputs are typed artifacts: a scene and a chip store are ``dsl.Dataset``
  *folders* (``artifact.path`` is a local path: the pipeline root on ``kfp.local``, the
  ``/minio/...`` / ``/s3/...`` mount of the launcher on a cluster), reports are
  ``dsl.Artifact`` JSON files, counts are ``dsl.Metrics`` (their values live in the
  artifact's metadata; each component also writes them as JSON to ``metrics.path`` so the
  artifact is a real file: kfp.local's cache treats a missing artifact file as a cache miss,
  which would otherwise defeat caching of every task with a Metrics output);
- no stage logic: each body parses its inputs into the library's typed config, calls the one
  library function, and records what it returned.

``components`` is an installed package (pyproject.toml), like ``pipelines``, which imports
them as ``components.<stage>``; the library never imports either. ``components.paths`` is the
doors' one helper that makes a user's path absolute (the CLI imports it too; importing it
does not import kfp: the components themselves load on first use).
"""

import importlib

BASE_IMAGE = "ghcr.io/sarflow/sarflow:0.1.0"
# the GPU tasks' image (pretraining, embedding): docker/Dockerfile.gpu, the same code with CUDA torch
GPU_IMAGE = "ghcr.io/sarflow/sarflow-gpu:0.1.0"

# component -> its module, imported on first use (PEP 562): `import components.paths` (what the
# CLI uses to make paths absolute) must not cost every command an import of kfp
_MODULES = {
    "synth_scene": "synth", "ingest_scene": "ingest",
    "tile_scene": "tile", "list_checksum_parts": "tile", "checksum_inputs": "tile", "survey_tiles": "tile", "screen_tiles": "tile", "plan_tiles": "tile", "write_tile_units": "tile", "finalize_tiles": "tile", "tile_units_job": "tile",
    "version_chips": "version",
    "pretrain_encoder": "pretrain", "pretrain_trainjob": "pretrain", "encoder_reference": "pretrain",
    "embed_chips": "embed", "plan_embed": "embed", "embed_shards": "embed", "publish_embeddings": "embed",
    "materialize_features": "materialize", "plan_materialize": "materialize", "materialize_part": "materialize",
    "train_probes": "downstream", "train_llp": "downstream", "report_results": "downstream",
    "promote_model": "promote", "publish_champion": "promote",
}

__all__ = ["BASE_IMAGE", "GPU_IMAGE", *_MODULES]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"components.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'components' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})

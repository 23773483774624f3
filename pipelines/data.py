"""The data pipeline: synth -> ingest -> tile -> version, fanned out over scene seeds.

```
exit handler (record-status: always runs, records the final state and any failure)
└── ParallelFor seed in seeds
    ├── synth-scene(seed)        -> scene  (Dataset, folder with catalog.yaml)
    ├── ingest-scene(scene)      -> manifest (Artifact), metrics   (gate: validate first)
    ├── tile-scene(scene)        -> store  (Dataset, Zarr v3 chip store folder), metrics
    │       .after(ingest-scene)
    └── version-chips(store)     -> version (Artifact JSON), metrics, dvc_md5/git_commit/catalog_hash
```

Every stage is a component from ``components/`` (a thin wrapper over the library); this
module only wires them and sets the platform details:

- **caching** keyed on inputs: synth, ingest and tile enable KFP caching (the key is the
  component spec plus its input parameters and artifacts, so the same seed and options
  reuse the scene and the store); version and the exit task never cache (they have side
  effects: a push to the remote, a failure record);
- **secrets**: tasks that may touch object storage (ingest, tile, version) get the MinIO
  keys from the Kubernetes secret ``sarflow-minio`` as ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (kfp.kubernetes.use_secret_as_env; the secret's own key names
  are in ``S3_SECRETS``), and ``AWS_ENDPOINT_URL`` / ``AWS_DEFAULT_REGION`` from the
  ConfigMap ``sarflow-pipeline-env`` that k8s/ deploys; a non-empty ``s3_endpoint``
  parameter overrides the endpoint. On a cluster pass ``dvc_remote=s3://sarflow-dvc``: the
  DVC repository lives in the pod, the pushed remote is what stays;
- **resources**: CPU/memory requests and limits per task (``RESOURCES``), and the pod label
  ``sarflow.io/pipeline=true`` that k8s/'s NetworkPolicies require to reach MinIO.

Local runs (``kfp.local``, SubprocessRunner(use_venv=False)): kfp 2.17's local
orchestrator runs this very pipeline, ParallelFor (iterations in parallel threads, up to
``PARALLELISM``) and ExitHandler (the exit task gets a real PipelineTaskFinalStatus, also
when the body fails and ``raise_on_error=False``) included, so there is no separate local
variant. What kfp.local does *not* do, and the cluster does: it ignores the Kubernetes
platform config (the secret is not mounted: the task inherits the caller's environment, so
export ``AWS_*`` yourself), ignores CPU/memory limits and the image (tasks run in the
current interpreter), and caches only when ``kfp.local.init(enable_caching=True)``.
"""

from typing import List

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Output

from components.ingest import ingest_scene
from components.synth import synth_scene
from components.tile import tile_scene
from components.version import version_chips

PIPELINE_NAME = "sarflow-data"
# Kubernetes secrets holding MinIO keys (k8s/base/secrets/*.example.env): secret key -> env var
S3_SECRETS = {
    "sarflow-minio": {"MINIO_ROOT_USER": "AWS_ACCESS_KEY_ID", "MINIO_ROOT_PASSWORD": "AWS_SECRET_ACCESS_KEY"},
    "sarflow-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
}
MINIO_SECRET = "sarflow-s3"  # the bucket-scoped MinIO user (k8s/README.md), not the root key
MINIO_SECRET_KEYS = S3_SECRETS[MINIO_SECRET]
PIPELINE_ENV_CONFIGMAP = "sarflow-pipeline-env"  # k8s/base/kustomization.yaml: the endpoints
PIPELINE_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
POD_LABEL = ("sarflow.io/pipeline", "true")  # what the NetworkPolicies admit to minio:9000
PARAMS_SECTIONS = ("synth", "tile")  # params.yaml sections whose keys become pipeline arguments
PARALLELISM = 4  # scenes tiled at once
# task -> (cpu request, cpu limit, memory request, memory limit)
RESOURCES = {
    "synth": ("1", "2", "2Gi", "8Gi"),
    "ingest": ("500m", "1", "1Gi", "2Gi"),
    "tile": ("2", "4", "4Gi", "8Gi"),
    "version": ("500m", "2", "1Gi", "4Gi"),
    "status": ("100m", "500m", "128Mi", "512Mi"),
}


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def record_status(status: dsl.PipelineTaskFinalStatus, report: Output[Artifact], failure_log: str = ""):
    """Exit task: records the final state of the pipeline (and the error, if it failed) as a
    JSON artifact; when `failure_log` is a path, a failed run also appends a JSON line there."""
    import datetime
    import json
    import os

    record = {
        "state": status.state,
        "pipeline_job": status.pipeline_job_resource_name,
        "pipeline_task": status.pipeline_task_name,
        "error_code": status.error_code,
        "error_message": status.error_message,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(record))
    os.makedirs(os.path.dirname(report.path), exist_ok=True)
    with open(report.path, "w") as f:
        json.dump(record, f, indent=1)
    report.metadata.update({k: v for k, v in record.items() if v is not None})
    if failure_log and status.state != "SUCCEEDED":
        os.makedirs(os.path.dirname(os.path.abspath(failure_log)), exist_ok=True)
        with open(failure_log, "a") as f:
            f.write(json.dumps(record) + "\n")


def _resources(task: dsl.PipelineTask, kind: str) -> dsl.PipelineTask:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[kind]
    return task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)


def _minio(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MinIO keys as env from the secret, the endpoint and region from the pipeline ConfigMap."""
    kubernetes.use_secret_as_env(task, secret_name=MINIO_SECRET, secret_key_to_env=MINIO_SECRET_KEYS)
    return kubernetes.use_config_map_as_env(task, PIPELINE_ENV_CONFIGMAP, {k: k for k in PIPELINE_ENV})


def _sarflow_pod(task: dsl.PipelineTask, kind: str) -> dsl.PipelineTask:
    """Resources and the pod label every sarflow task carries."""
    return kubernetes.add_pod_label(_resources(task, kind), *POD_LABEL)


@dsl.pipeline(name=PIPELINE_NAME, description="sarflow data plane: synthetic scenes -> ingest -> chip stores -> DVC versions")
def data_pipeline(
    seeds: List[int] = [0, 1],
    size_px: int = 512,
    chip_size: int = 64,
    cloud_fraction: float = 0.3,
    workers: int = 2,
    shard_chips: int = 64,
    block_chips: int = 4,
    split_block: int = 4,
    checksum: bool = True,
    dvc_remote: str = "",
    s3_endpoint: str = "",
    failure_log: str = "",
):
    exit_task = record_status(failure_log=failure_log).set_display_name("record-status")
    exit_task.set_caching_options(False)
    _sarflow_pod(exit_task, "status")
    with dsl.ExitHandler(exit_task, name="data-plane"):
        with dsl.ParallelFor(seeds, parallelism=PARALLELISM, name="scenes") as seed:
            synth = synth_scene(seed=seed, size_px=size_px, chip_size=chip_size, cloud_fraction=cloud_fraction)
            synth.set_display_name("synth").set_caching_options(True)
            _sarflow_pod(synth, "synth")

            ingest = ingest_scene(scene=synth.outputs["scene"], checksum=checksum, s3_endpoint=s3_endpoint)
            ingest.set_display_name("ingest").set_caching_options(True)
            _minio(_sarflow_pod(ingest, "ingest"))

            tile = tile_scene(scene=synth.outputs["scene"], workers=workers, shard_chips=shard_chips,
                              block_chips=block_chips, split_block=split_block, checksum=checksum,
                              s3_endpoint=s3_endpoint)
            tile.after(ingest)  # ingest is the gate: bad inputs fail before any tiling
            tile.set_display_name("tile").set_caching_options(True)
            _minio(_sarflow_pod(tile, "tile"))

            version = version_chips(store=tile.outputs["store"], remote=dvc_remote, s3_endpoint=s3_endpoint)
            version.set_display_name("version").set_caching_options(False)
            _minio(_sarflow_pod(version, "version"))

"""What every sarflow pipeline task carries on a cluster, in one place: resources, the pod
label the NetworkPolicies admit, object-storage credentials and endpoints, the GPU placement,
and the exit task that records how a run ended.

- **secrets as environment**: the MinIO keys from the Kubernetes secret ``sarflow-s3`` (the
  bucket-scoped MinIO user, k8s/README.md) as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``;
  the MLflow server's basic-auth login from ``sarflow-mlflow`` (``MLFLOW_TRACKING_USERNAME`` /
  ``_PASSWORD``, which the MLflow client reads); ``REDIS_PASSWORD`` from ``sarflow-redis`` on the
  feature tasks (the online store's ``requirepass``);
  the endpoints (``AWS_ENDPOINT_URL``, ``MLFLOW_TRACKING_URI``, ...) from the ConfigMap
  ``sarflow-pipeline-env`` that k8s/ deploys. Tasks reach MLflow through its server, which
  alone holds the PostgreSQL password (secret ``sarflow-postgres``): no task carries it.
- **Feast**: the same ConfigMap gives ``SARFLOW_FEAST_REGISTRY`` (the registry the feature
  server reads, ``s3://sarflow-feast/registry/registry.db``: what a pipeline applies is what the
  server serves), ``SARFLOW_FEAST_REPO`` (the task's Feast repo folder, a writable ``emptyDir``
  mounted there: sarflow writes its feature_store.yaml into it) and ``SARFLOW_FEAST_SERVER_URL``.
- **promotion lock**: ``SARFLOW_PROMOTION_LOCK`` (ConfigMap) names the PostgreSQL database of the
  gate's cross-pod advisory lock, as the role ``sarflow_lock``; promote tasks alone get its
  password as ``PGPASSWORD`` (secret ``sarflow-postgres``, key ``PROMOTION_LOCK_PASSWORD``, which
  libpq reads) and the pod label the NetworkPolicies admit to PostgreSQL.
- **GPU tasks** (pretraining in its task, embedding): ``set_accelerator_type('nvidia.com/gpu')``,
  ``set_accelerator_limit``, a node selector on the GPU pool's label and a toleration of its
  ``nvidia.com/gpu`` NoSchedule taint (the same as k8s/components/gpu-training), and a
  memory-backed ``/dev/shm`` emptyDir (``GPU_SHM``) for the reader processes' shared-memory batches.
- **resources**: CPU/memory requests and limits per task kind (``RESOURCES``).

kfp.local ignores all of this (no pods): tasks inherit the caller's environment.
"""

import sys

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Output
from kfp.dsl.pipeline_task import PipelineTask


def _ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp 2.17's own check, naming its caller from the caller's frame: kfp builds the whole
    `inspect.stack()` (every frame's source lines) on each resource setter, which costs about 7 s
    of CPU to define sarflow's pipelines, in every process that imports them (`sarflow demo`, each
    pipeline task's launcher). Same condition, same message."""
    if self.container_spec is None:
        caller = sys._getframe(1).f_code.co_name
        raise ValueError(f"{caller} can only be used on single-step components, not pipelines used as components, "
                         "or special components like importers.")


if hasattr(PipelineTask, "_ensure_container_spec_exists"):  # kfp 2.17: a private method every setter calls
    PipelineTask._ensure_container_spec_exists = _ensure_container_spec_exists

# Kubernetes secrets holding MinIO keys (k8s/base/secrets/*.example.env): secret key -> env var
S3_SECRETS = {
    "sarflow-minio": {"MINIO_ROOT_USER": "AWS_ACCESS_KEY_ID", "MINIO_ROOT_PASSWORD": "AWS_SECRET_ACCESS_KEY"},
    "sarflow-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
}
MINIO_SECRET = "sarflow-s3"  # the bucket-scoped MinIO user, not the root key
MINIO_SECRET_KEYS = S3_SECRETS[MINIO_SECRET]
PIPELINE_ENV_CONFIGMAP = "sarflow-pipeline-env"  # k8s/base/kustomization.yaml: the endpoints
PIPELINE_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "FEAST_S3_ENDPOINT_URL",
                "SARFLOW_FEAST_REGISTRY", "SARFLOW_FEAST_REPO", "SARFLOW_FEAST_SERVER_URL", "SARFLOW_PROMOTION_LOCK")
# promote tasks: the promotion lock's password (k8s/base/postgres/10-promotion-lock.sh) and the label
# that admits them to PostgreSQL:5432 (k8s/base/networkpolicies.yaml, promotion-lock-egress)
LOCK_KIND = "promote"
LOCK_SECRET = ("sarflow-postgres", {"PROMOTION_LOCK_PASSWORD": "PGPASSWORD"})
LOCK_POD_LABEL = ("sarflow.io/promotion-lock", "true")
# the MLflow server's basic-auth login (k8s/base/mlflow.yaml): every task with services, as the client's env
MLFLOW_SECRET = ("sarflow-mlflow", {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
# the Redis online store's password (requirepass, k8s/base/redis.yaml): the feature tasks only, which
# write and read the online store (sarflow.features.feast_store puts ${REDIS_PASSWORD} in Feast's config)
REDIS_KIND = "features"
REDIS_SECRET = ("sarflow-redis", {"REDIS_PASSWORD": "REDIS_PASSWORD"})
# the task's Feast repo folder: SARFLOW_FEAST_REPO's value in k8s/base/kustomization.yaml, a writable emptyDir
FEAST_REPO_VOLUME = ("feast-repo", "/etc/sarflow/feature_repo")
POD_LABEL = ("sarflow.io/pipeline", "true")  # what the NetworkPolicies admit to MinIO, MLflow, Redis
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")  # NVIDIA GPU Feature Discovery's node label
GPU_SHM = "8Gi"  # /dev/shm of a GPU task, as the Trainer runtime's (k8s/trainer/)
# task kind -> (cpu request, cpu limit, memory request, memory limit)
RESOURCES = {
    "synth": ("1", "2", "2Gi", "8Gi"),
    "ingest": ("500m", "1", "1Gi", "2Gi"),
    "tile": ("2", "4", "4Gi", "8Gi"),
    "version": ("500m", "2", "1Gi", "4Gi"),
    "pretrain": ("8", "16", "32Gi", "64Gi"),
    "launch": ("250m", "1", "1Gi", "2Gi"),  # launches a cluster job (the pretraining TrainJob) and waits for it
    "handoff": ("100m", "500m", "256Mi", "1Gi"),  # rewrites a parameter as an artifact (encoder-reference)
    "embed": ("4", "8", "16Gi", "32Gi"),
    "features": ("1", "4", "4Gi", "16Gi"),
    "downstream": ("2", "4", "4Gi", "16Gi"),
    "promote": ("250m", "1", "512Mi", "2Gi"),
    "report": ("250m", "1", "1Gi", "2Gi"),
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


def exit_task(failure_log: str) -> dsl.PipelineTask:
    """The exit handler's task (never cached: it records this run)."""
    task = record_status(failure_log=failure_log).set_display_name("record-status")
    task.set_caching_options(False)
    return sarflow_pod(task, "status")


def _resources(task: dsl.PipelineTask, kind: str) -> dsl.PipelineTask:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[kind]
    return task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)


def sarflow_pod(task: dsl.PipelineTask, kind: str) -> dsl.PipelineTask:
    """Resources and the pod label every sarflow task carries."""
    return kubernetes.add_pod_label(_resources(task, kind), *POD_LABEL)


def with_services(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MinIO keys and the MLflow login as env from their secrets; endpoints (S3, MLflow, the Feast
    registry and server) from the pipeline ConfigMap; a writable folder for the task's Feast repo."""
    kubernetes.use_secret_as_env(task, secret_name=MINIO_SECRET, secret_key_to_env=MINIO_SECRET_KEYS)
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET[0], secret_key_to_env=MLFLOW_SECRET[1])
    kubernetes.empty_dir_mount(task, volume_name=FEAST_REPO_VOLUME[0], mount_path=FEAST_REPO_VOLUME[1])
    return kubernetes.use_config_map_as_env(task, PIPELINE_ENV_CONFIGMAP, {k: k for k in PIPELINE_ENV})


def on_gpu(task: dsl.PipelineTask, gpus: int = 1) -> dsl.PipelineTask:
    """One or more NVIDIA GPUs, on the GPU pool, tolerating its taint, with a memory-backed
    /dev/shm (the data loaders' and `embed.readers`' batches travel through shared memory; a
    container's default is 64 MB)."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=GPU_SHM)
    kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
    return kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")


def stage(task: dsl.PipelineTask, name: str, kind: str, cache: bool, services: bool = True) -> dsl.PipelineTask:
    """Display name, caching, resources, label and (by default) the service credentials."""
    task.set_display_name(name).set_caching_options(cache)
    sarflow_pod(task, kind)
    if kind == LOCK_KIND:
        kubernetes.add_pod_label(task, *LOCK_POD_LABEL)
        kubernetes.use_secret_as_env(task, secret_name=LOCK_SECRET[0], secret_key_to_env=LOCK_SECRET[1])
    if kind == REDIS_KIND and services:
        kubernetes.use_secret_as_env(task, secret_name=REDIS_SECRET[0], secret_key_to_env=REDIS_SECRET[1])
    return with_services(task) if services else task

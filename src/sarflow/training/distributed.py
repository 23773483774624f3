"""Pretraining under `torchrun`: one or many nodes, one or many processes per node.

A Kubeflow Trainer ``TrainJob`` (torch-distributed runtime) gives every node's pod
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``; its command ``torchrun`` reads them and starts the processes with
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` set. From those:

- :func:`topology` tells Lightning the devices per node and the number of nodes (without them
  Lightning assumes one process: ``(1 * 1) does not match the world size (2)``), and picks DDP
  whenever there is more than one process (NCCL on GPUs, gloo on CPUs);
- :func:`is_main_process`: only global rank 0 talks to MLflow (opens the run, logs, registers)
  and writes artifacts; the other ranks train their share and log nothing (several ranks opening
  runs on a fresh SQLite database race its schema creation and hang);
- :func:`train_job`: the ``TrainJob`` manifest that runs ``sarflow pretrain`` this way on a
  cluster (``k8s/trainer/``).

Outside ``torchrun`` nothing changes: ``devices`` from the config, DDP only for several GPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping

from sarflow.errors import InputError

# what torchrun sets in every process it starts (torch.distributed.run)
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# what the Kubeflow Trainer torch plugin sets in every node's pod; torchrun reads them as its options
TRAINJOB_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


@dataclass(frozen=True)
class Topology:
    """Where this process sits: `world_size` processes over `num_nodes` nodes of `devices` each."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    devices: int = 1  # processes (devices) per node
    num_nodes: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_topology(environ: Mapping[str, str] | None = None) -> Topology | None:
    """The topology torchrun set in this process's environment, or None when not launched by
    torchrun. Inconsistent values are an InputError naming the variables."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in TORCHRUN_VARS):
        return None
    where = "torchrun environment (" + ", ".join(f"{k}={env[k]}" for k in TORCHRUN_VARS) + ")"
    try:
        world, rank, local_rank, local_world = (int(env[k]) for k in TORCHRUN_VARS)
    except ValueError:
        raise InputError(where, "every variable must be an integer") from None
    if world < 1 or local_world < 1 or world % local_world:
        raise InputError(where, "WORLD_SIZE must be a positive multiple of LOCAL_WORLD_SIZE (the same number "
                                "of processes on every node)")
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise InputError(where, "RANK and LOCAL_RANK must lie below WORLD_SIZE and LOCAL_WORLD_SIZE")
    return Topology(world, rank, local_rank, local_world, world // local_world)


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Global rank 0, or not launched by torchrun: the one process that talks to MLflow. A child
    that Lightning's own DDP launcher started (`--devices N` without torchrun) has LOCAL_RANK (and
    NODE_RANK) but no RANK: only local rank 0 of node 0 is the main one."""
    env = os.environ if environ is None else environ
    topo = launched_topology(env)
    if topo is not None:
        return topo.rank == 0
    return int(env.get("LOCAL_RANK", 0) or 0) == 0 and int(env.get("NODE_RANK", 0) or 0) == 0


def topology(devices: int | str, gpu: bool, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Lightning Trainer arguments ``devices``, ``num_nodes`` and ``strategy``.

    Under torchrun they come from the environment (a config's integer `devices` that disagrees
    with the processes torchrun started per node is refused, naming both); DDP whenever there
    is more than one process, with NCCL on GPUs and gloo on CPUs. Otherwise `devices` as given,
    one node, and DDP only for several visible GPUs."""
    topo = launched_topology(environ)
    if topo is None:
        import torch

        several = gpu and torch.cuda.device_count() > 1 and devices not in (1, "1")
        return {"devices": devices, "num_nodes": 1, "strategy": "ddp" if several else "auto"}
    if isinstance(devices, int) and devices not in (-1, topo.devices) or \
            isinstance(devices, str) and devices.isdigit() and int(devices) != topo.devices:
        raise InputError(f"pretrain.devices={devices}",
                         f"torchrun started {topo.devices} process(es) per node (LOCAL_WORLD_SIZE): under torchrun "
                         "each process drives one device, so leave devices at 'auto' or set it to that number")
    if not topo.distributed:
        return {"devices": 1, "num_nodes": 1, "strategy": "auto"}
    from lightning.pytorch.strategies import DDPStrategy

    return {"devices": topo.devices, "num_nodes": topo.num_nodes,
            "strategy": DDPStrategy(process_group_backend="nccl" if gpu else "gloo")}


@contextmanager
def main_run(experiment_id: str | None, tags: dict[str, str]):
    """``mlflow.start_run`` on the main process; ``None`` on every other rank (which must then
    log nothing: MLflow would open a run of its own for a stray log call)."""
    if not is_main_process():
        yield None
        return
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        yield run


# ------------------------------------------------------------------- the Kubeflow Trainer TrainJob

TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
TORCH_RUNTIME = "sarflow-torch-distributed"  # k8s/trainer: upstream torch-distributed made restricted-compliant
# what every sarflow pod reads from the pipeline ConfigMap and the S3 Secret (k8s/base)
CLUSTER_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
S3_SECRET = ("sarflow-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
# set by train_job in every pod of a TrainJob: its name (the MLflow run's tag TRAINJOB_TAG, by which the
# launcher finds the run and the version it registered) and params.yaml's pretrain section as JSON
TRAINJOB_ENV, TRAINJOB_TAG = "SARFLOW_TRAINJOB", "sarflow.trainjob"
PRETRAIN_SECTION_ENV = "SARFLOW_PRETRAIN_SECTION"


def trainjob_tag(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{TRAINJOB_TAG: name} in a TrainJob's pod (the run's tag), {} elsewhere."""
    name = (os.environ if environ is None else environ).get(TRAINJOB_ENV, "").strip()
    return {TRAINJOB_TAG: name} if name else {}


def pretrain_section(environ: Mapping[str, str] | None = None) -> dict | None:
    """params.yaml's pretrain section a TrainJob's pod received as JSON ($SARFLOW_PRETRAIN_SECTION),
    None when not given; anything but a JSON object is an InputError naming the variable."""
    import json

    text = (os.environ if environ is None else environ).get(PRETRAIN_SECTION_ENV, "").strip()
    if not text:
        return None
    try:
        section = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"${PRETRAIN_SECTION_ENV}", f"not valid JSON: {e}") from None
    if not isinstance(section, dict):
        raise InputError(f"${PRETRAIN_SECTION_ENV}", "must be a JSON object (params.yaml's pretrain section)")
    return section


def train_job(name: str, store: str, image: str, *, nodes: int = 1, gpus_per_node: int = 1,
              pretrain_args: list[str] | tuple[str, ...] = (), pretrain: dict | None = None, dataset_version: str = "",
              dataset_git_commit: str = "", cpu: str = "8", memory: str = "32Gi", namespace: str = "sarflow",
              config_map: str = "sarflow-pipeline-env", runtime: str = TORCH_RUNTIME) -> dict:
    """A TrainJob that runs ``sarflow pretrain STORE ARGS`` under torchrun on `nodes` nodes of
    `gpus_per_node` GPUs each (the torch-distributed runtime: torchrun reads the PET_* variables
    the Trainer sets, sarflow reads torchrun's). The pods get the endpoints from `config_map`, the
    S3 keys from the ``sarflow-s3`` Secret, the lineage by value, the job's name ($SARFLOW_TRAINJOB:
    the MLflow run's tag) and `pretrain` (params.yaml's pretrain section, $SARFLOW_PRETRAIN_SECTION)."""
    if nodes < 1 or gpus_per_node < 1:
        raise InputError(f"TrainJob {name}", f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be at least 1")
    env = [{"name": k, "valueFrom": {"configMapKeyRef": {"name": config_map, "key": k}}} for k in CLUSTER_ENV]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": S3_SECRET[0], "key": k}}} for k in S3_SECRET[1]]
    from sarflow.mlops.lineage import DATASET_COMMIT_ENV, DATASET_VERSION_ENV

    env += [{"name": k, "value": v} for k, v in ((DATASET_VERSION_ENV, dataset_version),
                                                 (DATASET_COMMIT_ENV, dataset_git_commit)) if v]
    env.append({"name": TRAINJOB_ENV, "value": name})
    if pretrain:
        import json

        env.append({"name": PRETRAIN_SECTION_ENV, "value": json.dumps(pretrain, sort_keys=True)})
    per_node = {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus_per_node}
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "sarflow"}},
        "spec": {
            "runtimeRef": {"name": runtime},
            "trainer": {
                "image": image,
                "command": ["torchrun", "--no-python", "sarflow", "pretrain", store, *pretrain_args],
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": {"requests": dict(per_node), "limits": dict(per_node)},
                "env": env,
            },
        },
    }


def run_train_job(manifest: dict, timeout_s: float = 7 * 86400, poll_s: float = 30.0, api=None) -> None:
    """Creates the TrainJob (in-cluster config, else ~/.kube/config) and waits until it is
    Complete: a TrainJob of that name still running is adopted, a finished one replaced
    (`sarflow.cluster.launch_and_wait`). `api`: a CustomObjectsApi."""
    from kubernetes.client.rest import ApiException

    from sarflow.cluster import ABSENT, conditions_state, kube_api, launch_and_wait

    api = api or kube_api("CustomObjectsApi")
    group, version = manifest["apiVersion"].split("/")
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    where = (group, version, ns, "trainjobs")

    def state() -> str:
        try:
            obj = api.get_namespaced_custom_object(*where, name)
        except ApiException as e:
            if e.status == 404:
                return ABSENT
            raise
        return conditions_state((obj.get("status") or {}).get("conditions"))

    launch_and_wait(f"TrainJob {ns}/{name}", lambda: api.create_namespaced_custom_object(*where, manifest), state,
                    lambda: api.delete_namespaced_custom_object(*where, name, propagation_policy="Foreground"),
                    timeout_s, poll_s, failed_hint=f" (`kubectl -n {ns} describe trainjob {name}`)")


def trainjob_result(tracking_uri: str, job: str) -> dict:
    """What `pretrain` returns, for the run a TrainJob made (found by its TRAINJOB_TAG): run_id,
    registered_model, version, model_uri, losses, embedding_dim, channels, lineage. The newest
    finished run of that tag (a rerun replaces a finished job of the same name, and its rank 0
    opens a new run beside the earlier attempt's). No finished run, or one that registered
    nothing, is a SarflowError naming the job."""
    import mlflow

    from sarflow.errors import SarflowError

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{TRAINJOB_TAG}` = '{job}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SarflowError(f"TrainJob {job}: no finished MLflow run tagged {TRAINJOB_TAG}={job} at {tracking_uri} "
                           "(its rank 0 opens one)")
    run = runs[0]
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    if not versions:
        raise SarflowError(f"TrainJob {job}: its run {run.info.run_id} registered no model")
    mv = max(versions, key=lambda v: int(v.version))
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    tags = client.get_model_version(mv.name, mv.version).tags
    return {"run_id": run.info.run_id, "registered_model": mv.name, "version": str(mv.version),
            "model_uri": mv.source, "losses": losses,
            "embedding_dim": int(tags.get("sarflow.embedding_dim", 0)),
            "channels": [c for c in tags.get("sarflow.channels", "").split(",") if c],
            "lineage": {k: v for k, v in run.data.tags.items() if k.startswith("sarflow.")}}

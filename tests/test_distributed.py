"""`sarflow pretrain` under torchrun, as a Kubeflow Trainer TrainJob runs it, and the TrainJob
manifest that does so on a cluster (sarflow.training.distributed).

The torchrun test starts two CPU processes (gloo) with the variables the Trainer's torch plugin
sets in a node's pod (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT) and nothing else: torchrun reads them as its options, exactly as in the pod.
This file is also the per-rank driver torchrun runs (``__main__`` below): the real `sarflow`
command, with `Trainer.fit` wrapped to record each rank's chips and final weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sarflow.errors import SarflowError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ topology (unit)


def test_topology_from_the_torchrun_environment():
    from sarflow.errors import InputError
    from sarflow.training.distributed import is_main_process, launched_topology, topology

    assert launched_topology({}) is None and is_main_process({})
    assert topology("auto", gpu=False, environ={}) == {"devices": "auto", "num_nodes": 1, "strategy": "auto"}
    # 2 nodes x 4 processes, this one global rank 5 (node 1, local rank 1)
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    topo = launched_topology(env)
    assert (topo.num_nodes, topo.devices, topo.rank, topo.distributed) == (2, 4, 5, True)
    assert not is_main_process(env) and is_main_process({**env, "RANK": "0", "LOCAL_RANK": "0"})
    # a child of Lightning's own DDP launcher has LOCAL_RANK but no RANK: only local rank 0 of node 0 is main
    assert is_main_process({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}) and not is_main_process({"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert not is_main_process({"WORLD_SIZE": "4", "LOCAL_RANK": "0", "NODE_RANK": "1"})
    kwargs = topology("auto", gpu=False, environ=env)
    assert (kwargs["devices"], kwargs["num_nodes"]) == (4, 2)
    assert kwargs["strategy"].process_group_backend == "gloo"
    assert topology(4, gpu=True, environ=env)["strategy"].process_group_backend == "nccl"
    with pytest.raises(InputError, match="torchrun started 4 process"):
        topology(1, gpu=False, environ=env)  # a config that contradicts the launcher is refused
    with pytest.raises(InputError, match="multiple of LOCAL_WORLD_SIZE"):
        launched_topology({**env, "WORLD_SIZE": "6"})
    # one process under torchrun: no DDP
    one = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert topology("auto", gpu=False, environ=one) == {"devices": 1, "num_nodes": 1, "strategy": "auto"}


# ------------------------------------------------------------------------ torchrun, two ranks


@pytest.mark.slow
def test_pretrain_under_torchrun_with_the_trainjob_environment(tiny_store, tmp_path):
    """Two ranks, as a one-node TrainJob with numProcPerNode 2: one MLflow run, identical weights
    on both ranks after training on different chips, the loss going down."""
    import mlflow
    import numpy as np

    torchrun = Path(sys.executable).with_name("torchrun")
    store = tmp_path / "chips.zarr"
    shutil.copytree(tiny_store, store)
    db = tmp_path / "mlflow.db"  # a fresh SQLite database: two ranks creating its schema would race
    out = tmp_path / "ranks"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_")) and
           k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
                "SARFLOW_TEST_RANK_DIR": str(out), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    # what train_job puts in every pod: the job's name and params.yaml's pretrain section
    section = {"method": "mae", "batch_size": 8, "vit": {"size": "tiny", "patch": 16, "depth": 1, "dim": 48},
               "optim": {"max_steps": 12}}
    env.update({"SARFLOW_TRAINJOB": "pretrain-ddp-test", "SARFLOW_PRETRAIN_SECTION": json.dumps(section)})
    cmd = [str(torchrun), __file__, "pretrain", str(store), "--tracking-uri", f"sqlite:///{db}", "--experiment", "ddp-test"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 12
    # each rank read its own shards, and DDP kept the weights identical
    assert ranks[0]["chips"] and ranks[1]["chips"] and not set(ranks[0]["chips"]) & set(ranks[1]["chips"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["weights_sha256"] != ranks[0]["initial_sha256"]

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # rank 1 opened no run
    assert len(client.search_experiments()) == 2  # Default + ddp-test: rank 1 created nothing either
    assert [str(v.version) for v in client.search_model_versions("name='sarflow-encoder-mae'")] == ["1"]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone reports
    assert summary["run_id"] == runs[0].info.run_id
    losses = [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # the TrainJob launcher finds the run by the job's tag, with what pretrain_encoder's reference needs
    from sarflow.training.distributed import trainjob_result

    found = trainjob_result(f"sqlite:///{db}", "pretrain-ddp-test")
    assert (found["run_id"], found["registered_model"], found["version"]) == (runs[0].info.run_id, "sarflow-encoder-mae", "1")
    assert found["losses"] == losses and found["embedding_dim"] > 0 and found["channels"]
    with pytest.raises(SarflowError, match="no finished MLflow run tagged sarflow.trainjob=another-job"):
        trainjob_result(f"sqlite:///{db}", "another-job")
    # a rerun's run beside an earlier attempt's (older, finished) and a still-running one: the newest finished wins
    exp = runs[0].info.experiment_id
    older = client.create_run(exp, start_time=runs[0].info.start_time - 60_000, tags={"sarflow.trainjob": "pretrain-ddp-test"})
    client.set_terminated(older.info.run_id, "FINISHED")
    client.create_run(exp, tags={"sarflow.trainjob": "pretrain-ddp-test"})  # RUNNING
    assert trainjob_result(f"sqlite:///{db}", "pretrain-ddp-test")["run_id"] == runs[0].info.run_id


# ------------------------------------------------------------------------- the TrainJob manifest

TRAINER = ROOT / "k8s" / "trainer"
EXAMPLE_JOB = dict(name="sarflow-pretrain", store="s3://sarflow-chips/chips.zarr", nodes=2, gpus_per_node=2,
                   pretrain_args=["--experiment", "sarflow-pretrain"],
                   pretrain={"method": "mae", "vit": {"size": "base", "patch": 16}, "optim": {"max_steps": 100000}},
                   dataset_version="<dvc md5 of the store>", dataset_git_commit="<data repository commit>")


def _strict(schema: dict) -> dict:
    """The CRD's structural schema as a JSON schema that refuses unknown fields (what
    `kubectl apply --validate=strict` reports; the API server would silently prune them)."""
    out = {k: v for k, v in schema.items() if k not in ("format", "default")}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = _strict(out["items"])
    return out


def trainjob_errors(obj: dict) -> list[str]:
    """Validation errors of a TrainJob against the vendored CRD schema and its CEL name rules."""
    import re

    import jsonschema
    import yaml

    crd = yaml.safe_load((TRAINER / "trainjob-v1alpha1.schema.yaml").read_text())
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(_strict(crd["openAPIV3Schema"])).iter_errors(obj)]
    if obj.get("apiVersion") != f"{crd['group']}/{crd['version']}" or obj.get("kind") != crd["kind"]:
        errors.append(f"not a {crd['kind']} of {crd['group']}/{crd['version']}")
    name = obj.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(crd["celRules"][0]["message"])
    if len(name) > 63:
        errors.append(crd["celRules"][1]["message"])
    return errors


def test_the_trainjob_manifest_is_generated_and_valid():
    import copy

    import yaml

    from components import GPU_IMAGE
    from sarflow.training.distributed import train_job

    job = train_job(image=GPU_IMAGE, **EXAMPLE_JOB)
    committed = yaml.safe_load((TRAINER / "pretrain-trainjob.yaml").read_text())
    assert committed == job, "k8s/trainer/pretrain-trainjob.yaml differs from train_job(**EXAMPLE_JOB): regenerate it"
    assert trainjob_errors(job) == []
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == GPU_IMAGE and job["spec"]["runtimeRef"] == {"name": "sarflow-torch-distributed"}
    assert trainer["command"][:5] == ["torchrun", "--no-python", "sarflow", "pretrain", EXAMPLE_JOB["store"]]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"] == 2
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "sarflow-pipeline-env"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "sarflow-s3"
    assert env["SARFLOW_DATASET_VERSION"]["value"] == EXAMPLE_JOB["dataset_version"]
    assert env["SARFLOW_TRAINJOB"]["value"] == EXAMPLE_JOB["name"]  # the run's tag, by which the launcher finds it
    assert json.loads(env["SARFLOW_PRETRAIN_SECTION"]["value"]) == EXAMPLE_JOB["pretrain"]
    # negative controls: the validation really runs
    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numProcsPerNode"] = 2
    wrong = copy.deepcopy(job)
    wrong["spec"]["trainer"]["numNodes"] = "two"
    bare = copy.deepcopy(job)
    del bare["spec"]["runtimeRef"]
    badname = copy.deepcopy(job)
    badname["metadata"]["name"] = "Pretrain_1"
    for broken in (typo, wrong, bare, badname):
        assert trainjob_errors(broken), broken["spec"]


class _TrainJobsAPI:
    """The part of kubernetes' CustomObjectsApi that run_train_job calls, over in-memory TrainJobs
    with the API server's answers (409 on a taken name, 404 on a missing one); no cluster here. A
    job gets its Complete (or `outcome`) condition after two reads; a deleted one is gone after one."""

    def __init__(self, outcome="Complete"):
        self.jobs, self.calls, self.outcome = {}, [], outcome

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        from kubernetes.client.rest import ApiException

        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[name] = {"reads": 0, "conditions": [], "deleting": False}

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        from kubernetes.client.rest import ApiException

        job = self.jobs.get(name)
        if job is None:
            raise ApiException(status=404, reason="NotFound")
        if job["deleting"]:
            del self.jobs[name]
            raise ApiException(status=404, reason="NotFound")
        job["reads"] += 1
        if job["reads"] >= 2 and not job["conditions"]:
            job["conditions"] = [{"type": "Created", "status": "True"}, {"type": self.outcome, "status": "True"}]
        return {"metadata": {"name": name}, "status": {"conditions": job["conditions"]}}

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.calls.append(("delete", name))
        self.jobs[name]["deleting"] = True


def test_the_trainjob_launcher_waits_adopts_and_replaces():
    from components import GPU_IMAGE
    from sarflow.training.distributed import run_train_job, train_job

    job = train_job(image=GPU_IMAGE, **EXAMPLE_JOB)
    api = _TrainJobsAPI()
    run_train_job(job, poll_s=0, api=api)  # created, waited until Complete
    assert api.calls == [("create", "sarflow-pretrain")]
    api.calls.clear()
    run_train_job(job, poll_s=0, api=api)  # a rerun: the finished job is deleted and created anew
    assert api.calls == [("create", "sarflow-pretrain"), ("delete", "sarflow-pretrain"), ("create", "sarflow-pretrain")]
    api.jobs["sarflow-pretrain"] = {"reads": 0, "conditions": [], "deleting": False}  # still running
    api.calls.clear()
    run_train_job(job, poll_s=0, api=api)  # adopted, not replaced
    assert api.calls == [("create", "sarflow-pretrain")]
    failing = _TrainJobsAPI(outcome="Failed")
    with pytest.raises(RuntimeError, match="TrainJob sarflow/sarflow-pretrain failed .*kubectl -n sarflow describe"):
        run_train_job(job, poll_s=0, api=failing)
    # deleted from outside while the launcher waits: an error at once, not a wait until the timeout
    gone = _TrainJobsAPI(outcome="Complete")
    real_get = gone.get_namespaced_custom_object

    def deleted_after_creation(*a):
        gone.jobs["sarflow-pretrain"]["deleting"] = True
        return real_get(*a)

    gone.get_namespaced_custom_object = deleted_after_creation
    with pytest.raises(RuntimeError, match="disappeared before it completed"):
        run_train_job(job, poll_s=0, timeout_s=3600, api=gone)


def test_a_pretrain_section_in_the_environment_must_be_a_json_object():
    from sarflow.errors import InputError
    from sarflow.training.distributed import pretrain_section, trainjob_tag

    assert pretrain_section({}) is None and trainjob_tag({}) == {}
    assert pretrain_section({"SARFLOW_PRETRAIN_SECTION": '{"method": "dino"}'}) == {"method": "dino"}
    assert trainjob_tag({"SARFLOW_TRAINJOB": "j1"}) == {"sarflow.trainjob": "j1"}
    with pytest.raises(InputError, match="SARFLOW_PRETRAIN_SECTION.*not valid JSON"):
        pretrain_section({"SARFLOW_PRETRAIN_SECTION": "{method: dino"})
    with pytest.raises(InputError, match="must be a JSON object"):
        pretrain_section({"SARFLOW_PRETRAIN_SECTION": "[1, 2]"})


# -------------------------------------------------------------- the per-rank driver (torchrun)


def _state_sha256(module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _driver(argv: list[str]) -> None:
    """One torchrun rank: the `sarflow` command, recording this rank's chips and weights."""
    import lightning as L
    import torch

    torch.set_num_threads(1)
    out = Path(os.environ["SARFLOW_TEST_RANK_DIR"])
    fit = L.Trainer.fit

    class Chips(L.Callback):
        def __init__(self):
            self.chips = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.chips += [int(i) for i in batch["index"]]

    def fit_and_record(self, model, *args, **kwargs):
        chips = Chips()
        self.callbacks.append(chips)
        initial = _state_sha256(model)
        fit(self, model, *args, **kwargs)
        record = {"rank": self.global_rank, "world_size": self.world_size, "steps": self.global_step,
                  "chips": chips.chips, "initial_sha256": initial, "weights_sha256": _state_sha256(model)}
        (out / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    L.Trainer.fit = fit_and_record
    from sarflow.cli.main import app

    app(argv, prog_name="sarflow")


if __name__ == "__main__":
    _driver(sys.argv[1:])

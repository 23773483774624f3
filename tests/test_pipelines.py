"""The Kubeflow spine of the data plane: components, the compiled data pipeline, a real
kfp.local run (SubprocessRunner, use_venv=False) and the `sarflow pipeline` commands.

Nothing is mocked: components run the library on a tiny synthetic scene, the local run
starts real subprocesses that import the installed sarflow, DVC pushes to a folder remote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from pipelines import load, names

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHIP, SHARD = 128, 32, 16
IMAGE = "ghcr.io/sarflow/sarflow:0.1.0"
GPU_IMAGE = "ghcr.io/sarflow/sarflow-gpu:0.1.0"  # docker/Dockerfile.gpu: the GPU tasks' image
GPU_TASKS = ("exec-pretrain-encoder", "exec-embed-shards")  # every embedding part: one GPU each
# the tasks that make MLflow runs or Feast partitions, each recording the store's lineage
LINEAGE_TASKS = ("pretrain-encoder", "embed-shards", "train-probes", "train-llp")
STAGES = ("synth-scene", "ingest-scene", "tile-scene", "version-chips")


@pytest.fixture(scope="module", autouse=True)
def _project_on_path():
    """`components` and `pipelines` are top-level folders of the project, not installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield


def _remote_has(remote: Path, md5: str) -> bool:
    """DVC 3 lays a pushed object out as <remote>/files/md5/<2 hex>/<rest>."""
    return (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def _dvc_file_md5(store: Path) -> str:
    return yaml.safe_load(store.with_name(store.name + ".dvc").read_text())["outs"][0]["md5"]


# ---------------------------------------------------------------- components, called directly

def test_components_python_func_on_a_tiny_scene(tmp_path):
    from kfp.dsl import Artifact, Dataset, Metrics

    from components import ingest_scene, synth_scene, tile_scene, version_chips
    from sarflow.data.catalog import load_catalog
    from sarflow.data.chipstore import open_store

    scene = Dataset(name="scene", uri=str(tmp_path / "synth" / "scene"))
    synth_scene.python_func(scene=scene, seed=11, size_px=SIZE, chip_size=CHIP)
    catalog = Path(scene.path) / "catalog.yaml"
    assert catalog.is_file() and (Path(scene.path) / "s2rgb.tif").is_file()
    loaded = load_catalog(catalog)
    assert scene.metadata["catalog"] == "catalog.yaml"
    assert scene.metadata["catalog_hash"] == loaded.catalog.hash()
    assert loaded.catalog.grid.chip_size == CHIP

    # downstream tasks see the artifact as KFP hands it over: a URI plus metadata
    scene_in = Dataset(name="scene", uri=scene.uri, metadata=dict(scene.metadata))
    manifest = Artifact(name="manifest", uri=str(tmp_path / "ingest" / "manifest"))
    ingest_metrics = Metrics(name="metrics", uri=str(tmp_path / "ingest" / "metrics"))
    ingest_scene.python_func(scene=scene_in, manifest=manifest, metrics=ingest_metrics)
    doc = json.loads(Path(manifest.path).read_text())
    assert doc["catalog_hash"] == loaded.catalog.hash()
    assert [s["name"] for s in doc["sources"]] == [s.name for s in loaded.catalog.sources]
    assert ingest_metrics.metadata["sources"] == len(loaded.catalog.sources)
    assert ingest_metrics.metadata["candidate_chips"] >= (SIZE // CHIP) ** 2 // 2
    assert json.loads(Path(ingest_metrics.path).read_text()) == ingest_metrics.metadata

    store = Dataset(name="store", uri=str(tmp_path / "tile" / "store"))
    tile_metrics = Metrics(name="metrics", uri=str(tmp_path / "tile" / "metrics"))
    tile_scene.python_func(scene=scene_in, store=store, metrics=tile_metrics, shard_chips=SHARD)
    chips = open_store(store.path)
    assert chips.n_chips > 0
    assert tile_metrics.metadata["chips"] == chips.n_chips == store.metadata["chips"] == len(chips.chips)
    assert sum(v for k, v in tile_metrics.metadata.items() if k.startswith("chips_")) == chips.n_chips
    assert chips.attrs["chip_size"] == CHIP and chips.attrs["catalog_hash"] == loaded.catalog.hash()
    assert chips.read("s1grd", 0).shape == (2, CHIP, CHIP)
    assert not Path(store.path + ".partial").exists()

    remote = tmp_path / "remote"
    version = Artifact(name="version", uri=str(tmp_path / "version" / "version"))
    version_metrics = Metrics(name="metrics", uri=str(tmp_path / "version" / "metrics"))
    out = version_chips.python_func(store=Dataset(name="store", uri=store.uri, metadata=dict(store.metadata)),
                                    version=version, metrics=version_metrics, remote=str(remote))
    record = json.loads(Path(version.path).read_text())
    assert out.dvc_md5 == record["dvc_md5"] == version.metadata["dvc_md5"] == _dvc_file_md5(Path(store.path))
    assert out.dvc_md5.endswith(".dir")
    assert out.catalog_hash == loaded.catalog.hash()
    assert record["pushed"] is True and _remote_has(remote, out.dvc_md5)
    assert version_metrics.metadata == {"chips": chips.n_chips, "pushed": 1}


# ---------------------------------------------------------------- the compiled pipeline

def _tasks(dag: dict) -> dict:
    return dag["dag"]["tasks"]


def test_resource_setters_check_the_container_without_walking_the_stack(monkeypatch):
    """pipelines.platform replaces kfp's check behind every resource setter, which built the whole
    inspect.stack() each time (about 7 s of CPU to define sarflow's pipelines): same condition, same
    message naming the setter, no stack walk."""
    import inspect

    from kfp import dsl

    import pipelines.platform  # noqa: F401 - installs the check

    def no_stack(*_a, **_k):
        raise AssertionError("inspect.stack() called")

    monkeypatch.setattr(inspect, "stack", no_stack)

    @dsl.component(base_image="python:3.11")
    def step():
        print("step")

    @dsl.pipeline(name="inner")
    def inner():
        step()

    @dsl.pipeline(name="outer")
    def outer():
        step().set_cpu_limit("1").set_memory_limit("1Gi").set_env_variable("A", "b")
        with pytest.raises(ValueError, match="^set_cpu_limit can only be used on single-step components"):
            inner().set_cpu_limit("1")

    assert outer.pipeline_spec is not None


def test_data_pipeline_compiles_to_ir_yaml(tmp_path):
    from sarflow.mlops.kfp_runner import compile_pipeline

    path = compile_pipeline(load("data"), tmp_path / "data.yaml")
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    assert spec["pipelineInfo"]["name"] == "sarflow-data"

    comps = spec["components"]
    for name in STAGES + ("record-status",):
        assert f"comp-{name}" in comps
    execs = spec["deploymentSpec"]["executors"]
    for name in STAGES + ("record-status",):
        container = execs[f"exec-{name}"]["container"]
        assert container["image"] == IMAGE
        command = " ".join(container["command"])
        assert "pip install" not in command  # nothing is installed at run time: no network
        assert "import sarflow" not in command.split("def ")[0]  # imports live in the function bodies
    assert "from sarflow.data.tile import TileOptions, tile" in " ".join(execs["exec-tile-scene"]["container"]["command"])

    # exit handler: record-status runs after the exit-handler group whatever its outcome
    root = _tasks(spec["root"])
    status = root["record-status"]
    assert status["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert status["dependentTasks"] == ["exit-handler-1"]
    assert "status" in comps["comp-record-status"]["inputDefinitions"]["parameters"]
    assert comps["comp-record-status"]["inputDefinitions"]["parameters"]["status"]["parameterType"] == "TASK_FINAL_STATUS"

    # ParallelFor over the seeds, inside the exit handler, with the four stages in each iteration
    exit_dag = comps[root["exit-handler-1"]["componentRef"]["name"]]
    (loop_name, loop), = _tasks(exit_dag).items()
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("seeds")
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    body = _tasks(comps[loop["componentRef"]["name"]])
    assert set(body) == set(STAGES)
    assert body["tile-scene"]["inputs"]["artifacts"]["scene"]["taskOutputArtifact"]["producerTask"] == "synth-scene"
    assert "ingest-scene" in body["tile-scene"]["dependentTasks"]
    assert body["version-chips"]["inputs"]["artifacts"]["store"]["taskOutputArtifact"]["producerTask"] == "tile-scene"

    # caching keyed on inputs for the pure stages, never for the side effects
    for name in ("synth-scene", "ingest-scene", "tile-scene"):
        assert body[name]["cachingOptions"] == {"enableCache": True}
    assert not body["version-chips"]["cachingOptions"].get("enableCache")
    assert not status["cachingOptions"].get("enableCache")

    # resource limits on every task
    for name in STAGES + ("record-status",):
        res = execs[f"exec-{name}"]["container"]["resources"]
        assert res["resourceCpuLimit"] and res["resourceMemoryLimit"]
    assert execs["exec-tile-scene"]["container"]["resources"]["resourceMemoryLimit"] == "8Gi"

    # MinIO keys from the bucket-scoped sarflow-s3 secret, as env, on the tasks that touch storage
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("ingest-scene", "tile-scene", "version-chips"):
        secrets = {s["secretName"]: {m["envVar"] for m in s["keyToEnv"]} for s in k8s[f"exec-{name}"]["secretAsEnv"]}
        # the MinIO keys and the MLflow server's basic-auth login; no Redis password, no database password
        assert secrets == {"sarflow-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "sarflow-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}
        (config,) = k8s[f"exec-{name}"]["configMapAsEnv"]
        assert config["configMapName"] == "sarflow-pipeline-env"
        assert "AWS_ENDPOINT_URL" in {m["envVar"] for m in config["keyToEnv"]}
    assert "secretAsEnv" not in k8s["exec-synth-scene"]
    for name in STAGES + ("record-status",):  # the label the NetworkPolicies admit
        assert k8s[f"exec-{name}"]["podMetadata"]["labels"] == {"sarflow.io/pipeline": "true"}
    assert "sarflow-s3" in path.read_text()


def test_compile_with_parameter_defaults(tmp_path):
    from sarflow.mlops.kfp_runner import PipelineError, compile_pipeline

    path = compile_pipeline(load("pipelines.data:data_pipeline"), tmp_path / "d.yaml",
                            defaults={"size_px": 256, "seeds": [4, 5, 6]})
    params = yaml.safe_load_all(path.read_text()).__next__()["root"]["inputDefinitions"]["parameters"]
    assert params["size_px"]["defaultValue"] == 256
    assert params["seeds"]["defaultValue"] == [4, 5, 6]
    with pytest.raises(PipelineError, match="no parameter"):
        compile_pipeline(load("data"), tmp_path / "x.yaml", defaults={"sizepx": 1})
    with pytest.raises(PipelineError, match="unknown pipeline"):
        compile_pipeline(load("nope"), tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


# ---------------------------------------------------------------- kfp.local runs

LOCAL_ARGS = dict(size_px=SIZE, chip_size=CHIP, shard_chips=SHARD)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The data pipeline, two seeds fanned out, under kfp.local with caching on."""
    from sarflow.mlops.kfp_runner import run_local

    base = tmp_path_factory.mktemp("kfp")
    remote = base / "remote"
    t0 = time.perf_counter()
    run = run_local(load("data"), base / "root", enable_caching=True, seeds=[0, 1], dvc_remote=str(remote), **LOCAL_ARGS)
    return run, remote, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_pipeline_runs_under_kfp_local(local_run):
    from sarflow.data.chipstore import open_store

    run, remote, seconds = local_run
    assert seconds < 150, f"the tiny local run took {seconds:.0f}s"
    assert run.state == "SUCCEEDED"
    assert {"for-loop-2-iteration-0", "for-loop-2-iteration-1", "record-status"} <= set(run.tasks)
    versions = run.versions
    assert len(versions) == 2
    stores = [Path(v["store"]) for v in versions]
    assert len(set(stores)) == 2 and all(run.run_dir in s.parents for s in stores)
    md5s = set()
    for v, store in zip(versions, stores):
        chips = open_store(store)
        assert chips.n_chips == v["chips"] > 0
        assert v["dvc_md5"] == _dvc_file_md5(store) and v["pushed"] is True
        assert _remote_has(remote, v["dvc_md5"])
        md5s.add(v["dvc_md5"])
    assert len(md5s) == 2  # two seeds, two datasets
    (status,) = run.status
    assert status["state"] == "SUCCEEDED" and not status["error_message"]
    summary = run.summary()
    assert sorted(summary["stores"]) == sorted(map(str, stores))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exit_handler_records_a_failure(tmp_path):
    from sarflow.mlops.kfp_runner import PipelineError, run_local

    log = tmp_path / "failures.jsonl"
    with pytest.raises(PipelineError, match="synth-scene"):
        run_local(load("data"), tmp_path / "root", seeds=[0], size_px=32, failure_log=str(log))  # too small: synth refuses
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["state"] == "FAILED" and record["error_message"]
    (run_dir,) = [p for p in (tmp_path / "root").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "record-status" / "report").read_text())
    assert report["state"] == "FAILED"
    assert not list(run_dir.rglob("store"))

    run = run_local(load("data"), tmp_path / "root2", raise_on_error=False, seeds=[0], size_px=32)
    assert run.state == "FAILED" and run.versions == []


# ---------------------------------------------------------------- the CLI

def _cli(args, **kw):
    from typer.testing import CliRunner

    from sarflow.cli.pipeline import pipeline_app

    return CliRunner().invoke(pipeline_app, args, **kw)


def test_cli_help_and_compile(tmp_path):
    for cmd in ([], ["compile"], ["run"], ["submit"]):
        res = _cli([*cmd, "--help"])
        assert res.exit_code == 0, res.output
    assert "--local" in _cli(["run", "--help"]).output
    assert "--host" in _cli(["submit", "--help"]).output

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": {"size_px": 300, "seed": 9, "seasons": ["summer"]},
                                      "tile": {"shard_chips": 8, "workers": 3, "split_fractions": [0.8, 0.1, 0.1]},
                                      "pretrain": {"workers": 0, "batch_size": 32}}))
    out = tmp_path / "out" / "data.yaml"
    res = _cli(["compile", "data", "--out", str(out), "--params", str(params), "-a", "seeds=[3,4]",
                "--arg", "dvc_remote=s3://sarflow/dvc"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output
    spec = next(yaml.safe_load_all(out.read_text()))
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["size_px"] == 300 and defaults["shard_chips"] == 8  # from params.yaml
    assert defaults["workers"] == 3  # the data pipeline reads synth and tile, not pretrain
    assert defaults["seeds"] == [3, 4] and defaults["dvc_remote"] == "s3://sarflow/dvc"  # from --arg

    listed = json.loads(_cli(["list", "--json"]).output)
    assert "seeds" in listed["data"]
    assert "data:\n" in _cli(["list"]).output and "  seeds = " in _cli(["list"]).output

    res = _cli(["compile", "nope", "--out", str(tmp_path / "n.yaml")])
    assert res.exit_code == 2 and "unknown pipeline" in res.output
    res = _cli(["compile", "data", "--out", str(tmp_path / "n.yaml"), "-a", "novalue"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output


def test_cli_run_needs_local_and_submit_reports_an_unreachable_server(tmp_path):
    res = _cli(["run", "data", "--pipeline-root", str(tmp_path)])
    assert res.exit_code == 2 and "--local" in res.output
    params = tmp_path / "none.yaml"
    params.write_text("{}\n")
    res = _cli(["submit", "data", "--host", "http://127.0.0.1:9", "--params", str(params), "-a", "size_px=128"])
    assert res.exit_code == 2
    assert "cannot submit pipeline 'data' to http://127.0.0.1:9" in res.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_run_local_reuses_cached_tasks(local_run, tmp_path):
    """`run --local --cache` with the inputs of the earlier run: synth, ingest and tile come
    from the cache (the store is the earlier run's), version runs again (never cached)."""
    run, remote, _ = local_run
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": {"size_px": SIZE, "chip_size": CHIP}, "tile": {"shard_chips": SHARD}}))
    summary_path = tmp_path / "summary.json"
    res = _cli(["run", "data", "--local", "--cache", "--pipeline-root", str(run.pipeline_root), "--params", str(params),
                "-a", "seeds=[1]", "-a", f"dvc_remote={remote}", "--summary", str(summary_path)])
    assert res.exit_code == 0, res.output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["state"] == "SUCCEEDED" and summary["run_dir"] != str(run.run_dir)
    (version,) = summary["versions"]
    earlier = {v["store"]: v["dvc_md5"] for v in run.versions}
    assert version["store"] in earlier  # the cached tile output of the first run
    assert version["dvc_md5"] == earlier[version["store"]]
    assert not list(Path(summary["run_dir"]).rglob("tile-scene"))  # tile did not run again


# ---------------------------------------------------------------- training and end-to-end pipelines

TRAINING_STAGES = ("pretrain-encoder", "plan-embed", "embed-shards", "publish-embeddings", "plan-materialize",
                   "materialize-part", "materialize-features", "train-probes", "train-llp",
                   "promote-model", "promote-model-2", "publish-champion", "publish-champion-2")


def _all_tasks(spec) -> dict[str, dict]:
    """Every task of every DAG of the spec, by task name."""
    found = dict(_tasks(spec["root"]))
    for comp in spec["components"].values():
        if "dag" in comp:
            found.update(_tasks(comp))
    return found


@pytest.mark.parametrize("name", ["training", "e2e", "e2e-catalog"])
def test_training_pipelines_compile_with_gpu_placement_and_a_gate(name, tmp_path):
    from sarflow.mlops.kfp_runner import compile_pipeline

    assert name in names()
    spec, platform = list(yaml.safe_load_all(compile_pipeline(load(name), tmp_path / f"{name}.yaml").read_text()))
    tasks = _all_tasks(spec)
    assert set(TRAINING_STAGES) <= set(tasks)
    execs = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for gpu_task in GPU_TASKS:
        resources = execs[gpu_task]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert k8s[gpu_task]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[gpu_task]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
        shm = [v for v in k8s[gpu_task]["emptyDirMounts"] if v["mountPath"] == "/dev/shm"]
        assert shm == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}], shm
    for cpu_task in ("exec-train-probes", "exec-materialize-features", "exec-promote-model", "exec-plan-embed",
                     "exec-publish-embeddings", "exec-materialize-part"):
        assert "accelerator" not in execs[cpu_task]["container"]["resources"]
        assert "nodeSelector" not in k8s[cpu_task]
    for exec_name, container in execs.items():  # limits everywhere, nothing installed at run time
        if "importer" in container:  # the importer is KFP's own driver, not a pod of ours
            continue
        assert container["container"]["resources"]["resourceMemoryLimit"], exec_name
        assert container["container"]["image"] == (GPU_IMAGE if exec_name in GPU_TASKS else IMAGE), exec_name
        assert "pip install" not in " ".join(container["container"]["command"])
    # secrets and endpoints as env: MinIO keys from sarflow-s3, MLflow's URL from the ConfigMap
    secrets = {s["secretName"]: {m["envVar"] for m in s["keyToEnv"]} for s in k8s["exec-train-probes"]["secretAsEnv"]}
    assert set(secrets) == {"sarflow-s3", "sarflow-mlflow"}
    # the Redis password on the feature tasks alone (they write and read the online store)
    redis = {name for name, ex in k8s.items() if any(s["secretName"] == "sarflow-redis" for s in ex.get("secretAsEnv", []))}
    assert redis and all(name.startswith(("exec-plan-embed", "exec-publish-embeddings", "exec-plan-materialize",
                                          "exec-materialize")) for name in redis), redis
    assert {m["envVar"] for ex in redis for s in k8s[ex]["secretAsEnv"] if s["secretName"] == "sarflow-redis"
            for m in s["keyToEnv"]} == {"REDIS_PASSWORD"}
    (config,) = k8s["exec-pretrain-encoder"]["configMapAsEnv"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= {m["envVar"] for m in config["keyToEnv"]}
    # the gate's decision drives a condition around publishing the champion (the other two: the pretraining switch)
    conditions = [t["triggerPolicy"]["condition"] for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")]
    gates = [c for c in conditions if "trainjob_nodes" not in c]
    assert len(conditions) == 4 and len(gates) == 2 and all("promote-model" in c and "Output" in c for c in gates)
    # pretraining is cached, keyed on the dataset version; the stages writing shared state never are
    assert tasks["pretrain-encoder"]["cachingOptions"] == {"enableCache": True}
    assert "dataset_version" in tasks["pretrain-encoder"]["inputs"]["parameters"]
    for task in ("embed-shards", "publish-embeddings", "materialize-part", "materialize-features", "train-probes",
                 "promote-model"):
        assert not tasks[task]["cachingOptions"].get("enableCache")
    assert "record-status" in _tasks(spec["root"])
    # the results report reads this run's probes and LLP runs, by their run ids
    params = tasks["report-results"]["inputs"]["parameters"]
    assert params["probes_run_id"]["taskOutputParameter"] == {"producerTask": "train-probes", "outputParameterKey": "run_id"}
    assert params["llp_run_id"]["taskOutputParameter"] == {"producerTask": "train-llp", "outputParameterKey": "run_id"}
    # lineage by value: the version task's outputs (or the pipeline's arguments) reach every run
    for task in LINEAGE_TASKS:
        params = tasks[task]["inputs"]["parameters"]
        for param, output in (("dataset_version", "dvc_md5"), ("dataset_git_commit", "git_commit")):
            if name == "training":  # no version task: the pipeline's own arguments
                assert params[param] == {"componentInputParameter": f"pipelinechannel--{param}"}, (task, param)
            elif "componentInputParameter" in params[param]:  # inside a ParallelFor: the channel handed into it
                assert params[param] == {"componentInputParameter": f"pipelinechannel--version-chips-{output}"}, \
                    (task, param)
            else:
                assert params[param]["taskOutputParameter"] == {"producerTask": "version-chips",
                                                                "outputParameterKey": output}, (task, param)
    # the Feast registry every pod shares, and a writable repo folder, from the pipeline ConfigMap
    (config,) = k8s["exec-materialize-features"]["configMapAsEnv"]
    assert {"SARFLOW_FEAST_REGISTRY", "SARFLOW_FEAST_REPO"} <= {m["envVar"] for m in config["keyToEnv"]}
    assert [v["mountPath"] for v in k8s["exec-materialize-features"]["emptyDirMounts"]] == ["/etc/sarflow/feature_repo"]


def _dag_holding(spec, task: str) -> dict[str, dict]:
    """The tasks of the DAG (root or sub-DAG) that holds `task`."""
    for dag in [spec["root"], *(c for c in spec["components"].values() if "dag" in c)]:
        if task in _tasks(dag):
            return _tasks(dag)
    raise AssertionError(f"no DAG holds {task}")


@pytest.mark.parametrize("name", ["training", "e2e"])
def test_embedding_and_materialization_fan_out_in_the_compiled_ir(name, tmp_path):
    """plan-embed -> ParallelFor(shard ranges) of embed-shards on one GPU each -> publish-embeddings
    over their Collected outputs; every consumer reads the published partition; the same shape for
    materialisation."""
    from pipelines.training import EMBED_PARALLELISM, MATERIALIZE_PARALLELISM
    from sarflow.mlops.kfp_runner import compile_pipeline

    spec, platform = list(yaml.safe_load_all(compile_pipeline(load(name), tmp_path / f"{name}.yaml").read_text()))
    comps, execs = spec["components"], spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    dag = _dag_holding(spec, "plan-embed")
    assert "embed-chips" not in _all_tasks(spec)  # no task embeds the whole store outside the fan-out

    loops = {t["parameterIterator"]["items"]["inputParameter"]: (n, t) for n, t in dag.items() if "parameterIterator" in t}
    embed_loop, loop = loops["pipelinechannel--plan-embed-Output"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == EMBED_PARALLELISM and "plan-embed" in loop["dependentTasks"]
    (body_name, body), = _tasks(comps[loop["componentRef"]["name"]]).items()
    assert body_name == "embed-shards"
    assert body["inputs"]["parameters"]["shards"]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    # the encoder: what the pretraining branch that ran handed on (test_the_pretraining_switch_...)
    assert body["inputs"]["artifacts"]["encoder"] == {
        "componentInputArtifact": "pipelinechannel--encoder-reference-chosen_encoder"}
    assert loop["inputs"]["artifacts"]["pipelinechannel--encoder-reference-chosen_encoder"]["taskOutputArtifact"] == {
        "producerTask": "encoder-reference", "outputArtifactKey": "chosen_encoder"}
    publish = dag["publish-embeddings"]
    assert publish["inputs"]["parameters"]["parts"]["taskOutputParameter"] == {  # dsl.Collected over the loop
        "producerTask": embed_loop, "outputParameterKey": "pipelinechannel--embed-shards-Output"}
    assert embed_loop in publish["dependentTasks"]
    for consumer in ("train-llp", "train-probes", "plan-materialize", "materialize-features"):
        src = dag[consumer]["inputs"]["artifacts"]["embeddings"]["taskOutputArtifact"]
        assert src == {"producerTask": "publish-embeddings", "outputArtifactKey": "embeddings"}, consumer

    # one GPU per embedding part, on the GPU pool, in the CUDA image; publish is a CPU task
    res = execs["exec-embed-shards"]["container"]["resources"]["accelerator"]
    assert (res["resourceType"], res["resourceCount"]) == ("nvidia.com/gpu", "1")
    assert execs["exec-embed-shards"]["container"]["image"] == GPU_IMAGE
    assert k8s["exec-embed-shards"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert "accelerator" not in execs["exec-publish-embeddings"]["container"]["resources"]
    assert execs["exec-publish-embeddings"]["container"]["image"] == IMAGE

    mat_loop, loop = loops["pipelinechannel--plan-materialize-Output"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == MATERIALIZE_PARALLELISM
    assert set(loop["dependentTasks"]) == {"plan-materialize"}
    assert set(_tasks(comps[loop["componentRef"]["name"]])) == {"materialize-part"}
    assert "train-llp" in dag["plan-materialize"]["dependentTasks"]  # the bags source exists before apply
    assert dag["materialize-features"]["inputs"]["parameters"]["parts"]["taskOutputParameter"] == {
        "producerTask": mat_loop, "outputParameterKey": "pipelinechannel--materialize-part-Output"}
    assert "materialize-features" in dag["train-probes"]["dependentTasks"]


@pytest.mark.parametrize("name", ["training", "e2e", "e2e-catalog"])
def test_the_pretraining_switch_compiles_to_if_else_and_one_of(name, tmp_path):
    """trainjob_nodes == 0 (the default): pretrain-encoder on a GPU node; else pretrain-trainjob, a
    CPU task that launches the TrainJob with the nodes, the pretrain section, the store and the
    lineage; encoder-reference takes dsl.OneOf of both branches' reference, and every embedding
    part reads its output."""
    from pipelines.training import TRAINJOB_RUNTIME
    from sarflow.mlops.kfp_runner import compile_pipeline
    from sarflow.training.distributed import TORCH_RUNTIME

    spec, platform = list(yaml.safe_load_all(compile_pipeline(load(name), tmp_path / f"{name}.yaml").read_text()))
    comps, execs = spec["components"], spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["trainjob_nodes"] == 0 and defaults["trainjob_gpus_per_node"] == 1
    assert defaults["trainjob_runtime"] == TRAINJOB_RUNTIME == TORCH_RUNTIME

    # the branches: one If/Else on the switch parameter, each holding one pretraining task
    (branches_name,) = [n for n, t in _all_tasks(spec).items() if n.startswith("condition-branches")]
    branches = _tasks(comps[f"comp-{branches_name}"])
    conditions = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()}
    nodes = "int(inputs.parameter_values['pipelinechannel--trainjob_nodes'])"
    assert conditions == {"pretrain-in-task": f"{nodes} == 0", "pretrain-trainjob": f"!({nodes} == 0)"}
    held = {t["taskInfo"]["name"]: set(_tasks(comps[t["componentRef"]["name"]])) for t in branches.values()}
    assert held == {"pretrain-in-task": {"pretrain-encoder"}, "pretrain-trainjob": {"pretrain-trainjob"}}

    # the TrainJob launcher's inputs: the switch's parameters, the section, the store, the lineage by value
    job = _dag_holding(spec, "pretrain-trainjob")["pretrain-trainjob"]
    params = job["inputs"]["parameters"]
    for param, source in (("nodes", "trainjob_nodes"), ("gpus_per_node", "trainjob_gpus_per_node"),
                          ("runtime", "trainjob_runtime"), ("pretrain", "pretrain"), ("tracking_uri", "tracking_uri")):
        assert params[param] == {"componentInputParameter": f"pipelinechannel--{source}"}, param
    for param, output in (("dataset_version", "dvc_md5"), ("dataset_git_commit", "git_commit")):
        channel = param if name == "training" else f"version-chips-{output}"  # the pipeline's own, or the version task's
        assert params[param] == {"componentInputParameter": f"pipelinechannel--{channel}"}, param
    # the store's URI as a string (the pipeline's, or the one the tile task returns): the waiting task
    # never downloads the store
    uri = "store_uri" if name == "training" else "tile-scene-Output"
    assert params["store_uri"] == {"componentInputParameter": f"pipelinechannel--{uri}"}
    assert "artifacts" not in job["inputs"]
    assert job["cachingOptions"] == {"enableCache": True}

    # the launcher only waits: the CPU image, no GPU, no GPU node; the in-task branch keeps the GPU
    launcher = execs["exec-pretrain-trainjob"]["container"]
    assert launcher["image"] == IMAGE and "accelerator" not in launcher["resources"]
    assert "nodeSelector" not in k8s["exec-pretrain-trainjob"] and "tolerations" not in k8s["exec-pretrain-trainjob"]
    assert {s["secretName"] for s in k8s["exec-pretrain-trainjob"]["secretAsEnv"]} == {"sarflow-s3", "sarflow-mlflow"}
    in_task = execs["exec-pretrain-encoder"]["container"]
    assert in_task["image"] == GPU_IMAGE and in_task["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"

    # dsl.OneOf of both branches' reference -> encoder-reference -> every embedding part's encoder
    (oneof_key, oneof), = comps[f"comp-{branches_name}"]["dag"]["outputs"]["parameters"].items()
    picked = {(s["producerSubtask"], s["outputParameterKey"]) for s in oneof["valueFromOneof"]["parameterSelectors"]}
    by_branch = {t["taskInfo"]["name"]: n for n, t in branches.items()}
    assert picked == {(by_branch["pretrain-in-task"], "pipelinechannel--pretrain-encoder-reference"),
                      (by_branch["pretrain-trainjob"], "pipelinechannel--pretrain-trainjob-reference")}
    dag = _dag_holding(spec, "encoder-reference")
    assert dag["encoder-reference"]["inputs"]["parameters"]["reference"]["taskOutputParameter"] == {
        "producerTask": branches_name, "outputParameterKey": oneof_key}
    assert execs["exec-encoder-reference"]["container"]["image"] == IMAGE
    assert "accelerator" not in execs["exec-encoder-reference"]["container"]["resources"]
    embed_loop = next(t for t in dag.values() if "pipelinechannel--encoder-reference-chosen_encoder" in
                      t.get("inputs", {}).get("artifacts", {}))
    assert _tasks(comps[embed_loop["componentRef"]["name"]])["embed-shards"]["inputs"]["artifacts"]["encoder"] == {
        "componentInputArtifact": "pipelinechannel--encoder-reference-chosen_encoder"}
    assert dag["publish-embeddings"]["inputs"]["artifacts"]["encoder"]["taskOutputArtifact"] == {
        "producerTask": "encoder-reference", "outputArtifactKey": "chosen_encoder"}
    assert not any("pretrain-" in json.dumps(t.get("inputs", {})) for n, t in dag.items()
                   if n != branches_name)  # nothing else reads a branch's output


def test_the_trainjob_launcher_refuses_a_store_its_nodes_cannot_read(tmp_path):
    """The TrainJob's nodes read the store from S3: a local store is a one-line InputError before
    any cluster call."""
    from kfp.dsl import Dataset, Metrics, Model

    from components.pretrain import pretrain_trainjob
    from sarflow.errors import InputError

    out = dict(encoder=Model(name="encoder", uri=str(tmp_path / "encoder")),
               metrics=Metrics(name="metrics", uri=str(tmp_path / "metrics")))
    with pytest.raises(InputError, match=r"^/data/chips.zarr: a TrainJob's nodes read the store from object storage"):
        pretrain_trainjob.python_func(store_uri="/data/chips.zarr", nodes=2, **out)
    local = Dataset(name="store", uri=str(tmp_path / "chips.zarr"))  # a local pipeline root's artifact
    with pytest.raises(InputError, match="s3:// store_uri"):
        pretrain_trainjob.python_func(store=local, nodes=2, **out)
    assert not (tmp_path / "encoder").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_pretraining_switch_runs_in_the_task_under_kfp_local(tiny_store, tmp_path):
    """The default (trainjob_nodes=0) under kfp.local: pretrain-encoder runs, the TrainJob branch does
    not, and encoder-reference hands on exactly the reference pretrain-encoder wrote."""
    from kfp import dsl
    from kfp.dsl import Dataset

    from pipelines.training import TRAINJOB_RUNTIME, pretrain_stages
    from sarflow.mlops.kfp_runner import run_local

    def switch(store_uri, tracking_uri, pretrain, trainjob_nodes=0):
        store = dsl.importer(artifact_uri=store_uri, artifact_class=Dataset, reimport=False)
        pretrain_stages(store.output, store_uri=store_uri, tracking_uri=tracking_uri, pretrain=pretrain,
                        trainjob=(trainjob_nodes, 1, TRAINJOB_RUNTIME), dataset_version="d41d8.dir",
                        dataset_git_commit="c0ffee")

    # types, not this module's postponed (string) annotations, are what KFP reads
    switch.__annotations__ = {"store_uri": str, "tracking_uri": str, "pretrain": dict, "trainjob_nodes": int}
    switch = dsl.pipeline(name="pretrain-switch")(switch)

    tiny = {"method": "mae", "batch_size": 8, "vit": {"size": "tiny", "patch": 8, "depth": 1, "dim": 32, "heads": 2},
            "optim": {"max_steps": 2, "warmup_steps": 1}, "monitor_every": 2, "monitor_chips": 8,
            "methods": {"mae": {"decoder_dim": 32, "decoder_depth": 1}}}
    run = run_local(switch, tmp_path / "kfp", store_uri=str(tiny_store), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    pretrain=tiny)
    (written,) = run.files("encoder")  # pretrain-encoder's own output: the TrainJob branch did not run
    (chosen,) = run.files("chosen_encoder")
    assert json.loads(chosen.read_text()) == json.loads(written.read_text())
    ref = json.loads(chosen.read_text())
    assert ref["model_uri"] == "models:/sarflow-encoder-mae/1" and ref["dataset_version"] == "d41d8.dir"
    assert not list(run.run_dir.rglob("pretrain-trainjob*"))


def test_params_sections_are_passed_whole_or_by_key():
    from pipelines import load
    from sarflow.mlops.kfp_runner import arguments_from_params

    params = {"synth": {"size_px": 256, "seed": 3}, "tile": {"shard_chips": 8},
              "pretrain": {"method": "dino", "output_size": None, "vit": {"size": "tiny"}}, "llp": {"steps": 5}, "other": {"x": 1}}
    args = arguments_from_params(load("e2e"), params)
    assert args["size_px"] == 256 and args["seed"] == 3 and args["shard_chips"] == 8
    assert args["pretrain"] == {"method": "dino", "vit": {"size": "tiny"}} and args["llp"] == {"steps": 5}
    assert "method" not in args and "x" not in args


def test_demo_on_a_catalog_runs_the_catalog_pipeline(tiny_scene, tmp_path):
    import pipelines
    from sarflow.local.demo import demo_arguments

    pipeline = pipelines.demo_pipeline(on_catalog=True)
    args = demo_arguments(pipeline, tmp_path, {"tile": {"shard_chips": 8}}, tiny_scene, None, {})
    assert pipeline is pipelines.load("e2e-catalog")
    assert args["scene_uri"] == str(tiny_scene.resolve().parent) and args["catalog"] == tiny_scene.name
    assert args["shard_chips"] == 8 and args["online"] == "sqlite"


@pytest.mark.slow
def test_training_components_python_func_on_the_tiny_store(tiny_store, tmp_path):
    """pretrain -> embed -> materialize -> promote -> publish, each component called as the
    task would call it, handing artifacts over as KFP does (URI + metadata)."""
    import shutil

    import mlflow
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from components import embed_chips, materialize_features, pretrain_encoder, promote_model, publish_champion
    from sarflow.features.feast_store import FeatureConfig, online_features
    from sarflow.data.chipstore import open_store
    from sarflow.data.versioning import version_store

    def art(cls, name, parent=None):  # KFP creates each output's folder before the task runs
        (tmp_path / (parent or name)).mkdir(exist_ok=True)
        return cls(name=name, uri=str(tmp_path / (parent or name) / name))

    def handed_over(a):
        return type(a)(name=a.name, uri=a.uri, metadata=dict(a.metadata))

    store_dir = tmp_path / "data" / "chips.zarr"
    shutil.copytree(tiny_store, store_dir)
    md5 = version_store(store_dir, repo=store_dir.parent, push=False)["dvc_md5"]
    store = Dataset(name="store", uri=str(store_dir))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    features_root = str(tmp_path / "features")

    encoder, m1 = art(Model, "encoder"), art(Metrics, "metrics", "pretrain")
    pretrained = pretrain_encoder.python_func(
        store=store, encoder=encoder, metrics=m1, tracking_uri=tracking, dataset_version=md5, dataset_git_commit="c0ffee",
        pretrain={"method": "mae", "batch_size": 8, "vit": {"size": "tiny", "patch": 8, "depth": 1, "dim": 32, "heads": 2},
                  "optim": {"max_steps": 2, "warmup_steps": 1},
                  "methods": {"mae": {"decoder_dim": 32, "decoder_depth": 1}, "dino": {"out_dim": 8}}})
    assert pretrained.model_uri == "models:/sarflow-encoder-mae/1" and pretrained.version == "1"
    ref = json.loads(Path(encoder.path).read_text())
    assert ref["dataset_version"] == md5 and ref["embedding_dim"] > 0
    mlflow.set_tracking_uri(tracking)
    run = mlflow.get_run(pretrained.run_id)
    assert run.data.tags["sarflow.dataset_dvc_md5"] == md5
    assert run.data.tags["sarflow.dataset_git_commit"] == "c0ffee"  # by value, not the store repository's commit

    embeddings, m2 = art(Dataset, "embeddings"), art(Metrics, "metrics", "embed")
    embed_chips.python_func(store=store, encoder=handed_over(encoder), embeddings=embeddings, metrics=m2,
                            features_root=features_root, tracking_uri=tracking)
    described = json.loads(Path(embeddings.path).read_text())
    chip_store = open_store(store_dir)
    assert described["rows"] == chip_store.n_chips and described["model"] == "sarflow-encoder-mae"

    features, m3 = art(Artifact, "features"), art(Metrics, "metrics", "materialize")
    materialize_features.python_func(embeddings=handed_over(embeddings), features=features, metrics=m3,
                                     features_root=features_root)
    record = json.loads(Path(features.path).read_text())
    view = "chip_embeddings_mae_v1"
    assert view in record["objects"] and record["materialized"][view]["rows"] == described["rows"]
    assert record["index"]["n"] == described["rows"]
    assert json.loads(Path(m3.path).read_text())["rows_materialized"] >= described["rows"]
    first = chip_store.chips["chip_id"].iloc[0]
    online = online_features(FeatureConfig(root=features_root), [first], [f"{view}:embedding"])
    assert len(online.embedding[0]) == described["dim"]

    # the gate on the encoder's registered model: first version becomes champion, publish loads it
    decision = art(Artifact, "decision")
    gated = json.dumps({"sarflow-encoder-mae": {"version": "1", "metric": "train/final_loss", "higher_is_better": False}})
    gate = promote_model.python_func(decision=decision, models=gated, tracking_uri=tracking)
    assert gate is True
    record = json.loads(Path(decision.path).read_text())
    assert record["promoted"] == ["sarflow-encoder-mae"] and record["models"][0]["champion"] == "1"
    card = art(Artifact, "card")
    publish_champion.python_func(decision=handed_over(decision), card=card, tracking_uri=tracking)
    (published,) = json.loads(Path(card.path).read_text())["models"]
    assert published["version"] == "1" and published["prediction_shape"][1] == described["dim"]
    again = promote_model.python_func(decision=art(Artifact, "decision2"), models=gated, tracking_uri=tracking)
    assert again is False  # already the champion: nothing moves


def test_lineage_by_value_wins_over_discovery(tiny_store, tmp_path, monkeypatch):
    """A pod has no DVC repository: the version task's values (arguments or given_lineage) are the
    lineage; the image's SARFLOW_CODE_COMMIT is the code commit; without them, discovery."""
    import shutil

    from sarflow.data.versioning import version_store
    from sarflow.mlops.lineage import CODE_COMMIT_ENV, code_commit, dataset_lineage, given_lineage

    store = tmp_path / "chips.zarr"
    shutil.copytree(tiny_store, store)
    bare = dataset_lineage(str(store))  # no repository around it: untracked
    assert bare["sarflow.dataset_dvc_md5"] == "untracked" and bare["sarflow.dataset_git_commit"] == "none"
    with given_lineage("d41d8cd98f00b204e9800998ecf8427e.dir", "abc123"):
        given = dataset_lineage(str(store))
    assert given["sarflow.dataset_dvc_md5"] == "d41d8cd98f00b204e9800998ecf8427e.dir"
    assert given["sarflow.dataset_git_commit"] == "abc123"
    assert dataset_lineage(str(store))["sarflow.dataset_dvc_md5"] == "untracked"  # the block ended
    assert dataset_lineage(str(store), "f00.dir")["sarflow.dataset_dvc_md5"] == "f00.dir"
    md5 = version_store(store, repo=tmp_path, push=False)["dvc_md5"]
    assert dataset_lineage(str(store))["sarflow.dataset_dvc_md5"] == md5  # discovered when nothing is given
    monkeypatch.setenv(CODE_COMMIT_ENV, "0123456789abcdef")
    assert code_commit() == "0123456789abcdef" and dataset_lineage(str(store))["sarflow.code_commit"] == "0123456789abcdef"


# ---------------------------------------------------------------- the embedding fan-out under kfp.local

FANOUT_MODEL, FANOUT_VIEW = "sarflow-encoder-mae", "chip_embeddings_mae_v1"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embedding_fans_out_under_kfp_local_into_one_partition(tiny_store, tmp_path):
    """embed.parts=2: two embed-shards tasks, one published partition holding every chip of the store
    exactly once, equal to one single-part run (the library's, unsharded); materialised in two parts,
    the online store serves every chip's embedding."""
    import numpy as np

    from helpers import tiny_features
    from sarflow.data.chipstore import open_store
    from sarflow.features.embed import read_embeddings, staging
    from sarflow.features.feast_store import FeatureConfig, online_features
    from sarflow.mlops.kfp_runner import run_local

    full = tiny_features(tiny_store, tmp_path / "single", FANOUT_MODEL)  # the single-part reference
    encoder = tmp_path / "encoder.json"
    encoder.write_text(json.dumps({"model_uri": f"models:/{FANOUT_MODEL}/1", "tracking_uri": full["uri"]}))
    root = tmp_path / "features"
    run = run_local(load("pipelines.training:embed_pipeline"), tmp_path / "kfp", store_uri=str(full["store"]), encoder_uri=str(encoder),
                    features_root=str(root), tracking_uri=full["uri"], embed={"parts": 2, "batch_size": 7},
                    online="sqlite")

    chips = open_store(full["store"]).chips
    (described,) = run.records("embeddings")
    assert described["parts"] == 2 and described["files"] == ["part-00000.parquet", "part-00001.parquet"]
    assert described["rows"] == len(chips) and described["model"] == FANOUT_MODEL
    assert len(run.files("metrics")) >= 4  # two embed-shards tasks (and publish, materialize) ran
    assert not staging(root, name=FANOUT_MODEL, version="1").exists()  # the parts were published, then removed

    got = read_embeddings(root, FANOUT_MODEL, "1").to_pandas()
    assert got.chip_id.is_unique and sorted(got.chip_id) == sorted(chips.chip_id)  # every chip exactly once
    ref = read_embeddings(full["root"], FANOUT_MODEL, "1").to_pandas().set_index("chip_id").loc[got.chip_id]
    assert got.split.tolist() == ref.split.tolist()
    np.testing.assert_allclose(np.stack(got.embedding.to_numpy()), np.stack(ref.embedding.to_numpy()),
                               rtol=1e-5, atol=1e-6)

    (features,) = run.records("features")
    done = features["materialized"][FANOUT_VIEW]
    assert done["rows"] == len(chips) and done["files"] == described["files"] and done["parts"] == 2
    assert features["index"]["n"] == len(chips)
    ids = got.chip_id.tolist()
    online = online_features(FeatureConfig(root=str(root)), ids, [f"{FANOUT_VIEW}:embedding"]).set_index("chip_id")
    np.testing.assert_allclose(np.stack(online.loc[ids].embedding.to_numpy()), np.stack(got.embedding.to_numpy()),
                               rtol=1e-6)

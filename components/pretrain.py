"""Component `pretrain-encoder`: self-supervised pretraining (MAE, DINO or CLIP-style) of an
encoder on a chip store, tracked in MLflow and registered as ``sarflow-encoder-<method>``.

Thin wrapper over :func:`sarflow.training.pretrain.pretrain`. The ``pretrain`` parameter is
params.yaml's ``pretrain:`` section as a dict (method, modalities, groups, batch_size, vit, optim,
methods: the inputs default to every input source of the store); the
``encoder`` output is a ``dsl.Model`` whose file is a JSON reference to the registered model
(the registry, not the pipeline root, is where models live). On a cluster this task runs on a
GPU node (pipelines/training.py sets the accelerator, node selector and toleration); the
library uses the GPU (bf16) when one is visible.

`pretrain-trainjob` trains the same encoder as a Kubeflow Trainer TrainJob over several GPU
nodes (a CPU task that launches it and waits). Both return the reference as the string output
``reference`` too: the pipelines choose one of them at run time (``dsl.If`` on
``trainjob_nodes``) and hand the chosen one on with ``dsl.OneOf`` over that string, which
`encoder-reference` turns back into the ``dsl.Model`` the embedding tasks read (kfp.local 2.17
resolves a ``dsl.OneOf`` of parameters, not of artifacts).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE, GPU_IMAGE



@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)  # a GPU task: the CUDA image
def pretrain_encoder(
    store: Input[Dataset],
    encoder: Output[Model],
    metrics: Output[Metrics],
    pretrain: dict = {},
    tracking_uri: str = "",
    dataset_version: str = "",
    dataset_git_commit: str = "",
) -> NamedTuple("Encoder", [("model_uri", str), ("registered_model", str), ("version", str), ("run_id", str), ("reference", str)]):
    """Trains, tracks and registers the encoder. `dataset_version` and `dataset_git_commit` are
    the version task's outputs (the store's DVC md5, the data commit), recorded as the run's
    lineage by value (a fresh pod has no DVC repository to discover them from); the version is
    part of the task's cache key too, so a new dataset version always retrains."""
    import json
    from collections import namedtuple

    from components.paths import absolute_uri
    from components.common import write_encoder_reference
    from sarflow.mlops.lineage import given_lineage
    from sarflow.params import Params, stage_config
    from sarflow.training.pretrain import PretrainConfig
    from sarflow.training.pretrain import pretrain as run_pretrain

    cfg = stage_config(PretrainConfig, Params({"pretrain": pretrain}, "pipeline parameter pretrain"), "pretrain",
                       {"tracking_uri": tracking_uri or None}, store=store.path)
    tracking_uri = absolute_uri(cfg.tracking_uri)  # recorded in the reference: the same database from any folder
    with given_lineage(dataset_version, dataset_git_commit):
        result = run_pretrain(cfg)
    ref = write_encoder_reference(result, encoder, metrics, tracking_uri, dataset_version)
    out = namedtuple("Encoder", ["model_uri", "registered_model", "version", "run_id", "reference"])
    return out(ref["model_uri"], ref["registered_model"], ref["version"], ref["run_id"], json.dumps(ref, sort_keys=True))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)  # a CPU task: the GPUs are the TrainJob's
def pretrain_trainjob(
    encoder: Output[Model],
    metrics: Output[Metrics],
    store_uri: str = "",
    store: Input[Dataset] = None,
    job_name: str = "",
    pretrain: dict = {},
    nodes: int = 1,
    gpus_per_node: int = 1,
    runtime: str = "",
    image: str = "",
    namespace: str = "",
    tracking_uri: str = "",
    dataset_version: str = "",
    dataset_git_commit: str = "",
    timeout_s: int = 7 * 86400,
) -> NamedTuple("Encoder", [("model_uri", str), ("registered_model", str), ("version", str), ("run_id", str), ("reference", str)]):
    """Multi-node pretraining: creates a Kubeflow Trainer TrainJob (`runtime`, default the
    sarflow-torch-distributed ClusterTrainingRuntime; `nodes` x `gpus_per_node`, the GPU image)
    that runs `sarflow pretrain STORE` under torchrun, waits for it, and gives the same `encoder`
    reference as `pretrain_encoder` (the run its rank 0 opened, found by the job's tag).

    The store is `store_uri` (an s3:// URI every node reads: the launcher never downloads it) or,
    when that is empty, the `store` artifact's URI (a pipeline root on the sarflow MinIO; KFP's
    launcher downloads an input artifact into this pod first). `job_name` names the TrainJob,
    by default after what it trains (store, dataset version, section, topology): a rerun of a
    finished job replaces it, a running one is adopted. The pods get `pretrain` (params.yaml's
    section) and the lineage by value."""
    import hashlib
    import json
    from collections import namedtuple

    from components import GPU_IMAGE
    from components.common import write_encoder_reference
    from sarflow.cluster import current_namespace
    from sarflow.errors import InputError
    from sarflow.params import default_tracking_uri
    from sarflow.training.distributed import TORCH_RUNTIME, run_train_job, train_job, trainjob_result

    uri = store_uri or (store.uri if store is not None else "")
    if not uri.startswith("s3://"):
        raise InputError(uri or "pretrain-trainjob", "a TrainJob's nodes read the store from object storage: give an "
                         "s3:// store_uri (or run the pipeline with its root on the sarflow MinIO)")
    image, runtime = image or GPU_IMAGE, runtime or TORCH_RUNTIME
    if not job_name:
        what = json.dumps([uri, dataset_version, pretrain, nodes, gpus_per_node, runtime, image], sort_keys=True)
        job_name = "sarflow-pretrain-" + hashlib.sha256(what.encode()).hexdigest()[:10]
    ns = namespace or current_namespace()
    manifest = train_job(job_name, uri, image, nodes=nodes, gpus_per_node=gpus_per_node, pretrain=pretrain,
                         dataset_version=dataset_version, dataset_git_commit=dataset_git_commit, namespace=ns,
                         runtime=runtime)
    run_train_job(manifest, timeout_s=timeout_s)
    tracking_uri = tracking_uri or default_tracking_uri()  # the pods' MLFLOW_TRACKING_URI (the pipeline ConfigMap's)
    ref = write_encoder_reference(trainjob_result(tracking_uri, job_name), encoder, metrics, tracking_uri, dataset_version)
    out = namedtuple("Encoder", ["model_uri", "registered_model", "version", "run_id", "reference"])
    return out(ref["model_uri"], ref["registered_model"], ref["version"], ref["run_id"], json.dumps(ref, sort_keys=True))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def encoder_reference(reference: str, chosen_encoder: Output[Model]):
    """The encoder reference that the pretraining branch which ran returned (`reference`: a
    dsl.OneOf of pretrain-encoder's and pretrain-trainjob's), as the Model artifact the embedding
    tasks read: the same JSON file and metadata as the branch's own `encoder` output."""
    import json

    from components.common import write_encoder_artifact

    write_encoder_artifact(json.loads(reference), chosen_encoder)

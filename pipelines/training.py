"""The training pipeline: pretrain (GPU node) -> embed -> materialize -> probes + LLP ->
promotion gate -> publish the champion, on a chip store that already exists.

```
exit handler (record-status)
├── importer(store_uri)             -> store (Dataset: a chip store folder, or s3:// on a cluster)
├── importer(bags_uri)              -> bags  (Dataset: polygons + statistics table, for LLP)
├── dsl.If(trainjob_nodes == 0)     pretraining in the task (the default; kfp.local, the demo)
│   └── pretrain-encoder(store)     -> encoder (Model: reference to sarflow-encoder-<method>/<v>)   [GPU]
├── dsl.Else                        pretraining as a Kubeflow Trainer TrainJob on trainjob_nodes nodes
│   └── pretrain-trainjob(store URI) -> the same reference; launches the TrainJob and waits   [CPU]
├── encoder-reference(dsl.OneOf(both branches' `reference`)) -> the encoder (Model) every later task reads
├── plan-embed(store, embed)        -> shards: embed.parts ranges A:B of the store's chip shards (default 1)
├── ParallelFor shards (up to EMBED_PARALLELISM at once)
│   └── embed-shards(store, encoder, A:B) -> a staged Parquet part of the features root (its own)   [GPU, one each]
├── publish-embeddings(Collected parts) -> embeddings (Dataset: the Feast offline partition, published
│                                       atomically once every part is there; chip labels written)
├── train-llp(store, embeddings, bags) -> registers sarflow-llp-<label>; writes the chip_bags source
├── plan-materialize(embeddings)    -> Feast apply (once), parts 0..P-1 (P: the most files of any view's source), after LLP
├── ParallelFor parts (up to MATERIALIZE_PARALLELISM at once)
│   └── materialize-part(i)         -> streams the i-th file of each view's source (incremental state per file)
├── materialize-features(embeddings, Collected reports) -> features (the parts' report + similarity index)
├── train-probes(store, embeddings) -> registers sarflow-<task> per evaluable task (after materialize: Feast training sets)
├── report-results(probes, llp)     -> one MLflow results-report run (tables + plots), its HTML in the UI
└── for probes and LLP: promote-model (every model it registered) -> dsl.If(any promoted) -> publish-champion
```

The same stages follow the data plane in the end-to-end pipeline (pipelines/e2e.py):
:func:`training_stages` builds them once for both.

- **GPU**: pretraining in its task (``PRETRAIN_GPUS``) and every embedding part (one each) request
  ``nvidia.com/gpu``, select the GPU pool's nodes and tolerate its taint (pipelines/platform.py);
- **multi-node pretraining**: ``trainjob_nodes`` (0, the default: in the task) switches pretraining to a
  Kubeflow Trainer TrainJob of that many nodes x ``trainjob_gpus_per_node`` GPUs on the
  ``trainjob_runtime`` ClusterTrainingRuntime (k8s/trainer). Its launcher, ``pretrain-trainjob``, is a
  CPU task in the CPU image that only creates the TrainJob and waits (the GPUs are the job's pods);
  both branches return the encoder reference as a string, and ``dsl.OneOf`` hands the one that ran to
  ``encoder-reference``, whose Model output the embedding tasks read (kfp.local resolves a OneOf of
  parameters, not of artifacts). The TrainJob's nodes read the store from S3: the training pipeline
  gives its ``store_uri``; the end-to-end pipelines the tile task's artifact, whose URI is on S3 when
  the pipeline root is on the sarflow MinIO;
- **fan-out**: params ``embed.parts`` shard ranges embed side by side (one GPU task each, each writing its
  own part; 1, the default, is one task over the whole store); every later task reads the partition
  ``publish-embeddings`` published (sarflow.features.embed.finalize_embeddings: no gap, no overlap, one
  model version, or nothing is published). Materialisation fans out over the parts too: its incremental
  state is one file per (view, source file) (on S3 under the features root with Redis), so no two parts
  share state; the parts of a local run share one Feast repo and take turns in it (components/materialize.py);
- **images**: the GPU tasks run docker/Dockerfile.gpu's image (``components.GPU_IMAGE``), the
  others the CPU image; both carry their code commit (``SARFLOW_CODE_COMMIT``);
- **lineage by value**: ``dataset_version`` and ``dataset_git_commit`` (the version task's
  ``dvc_md5`` and ``git_commit``, or the pipeline's arguments) go to every task that makes a run
  or a partition (pretrain, embed, probes, LLP), which records them: a fresh pod has no DVC
  repository to rediscover them from;
- **caching**: only pretraining caches (either branch, and the encoder hand-off), and its key
  includes ``dataset_version`` (the store's DVC md5), so a new dataset version always retrains;
  everything after it writes shared state (Feast, the registry) and always runs;
- **promotion**: each task in ``GATED`` returns the models it registered with their metric and
  direction (tasks come from the catalog's labels, so the pipeline cannot name them); the gate
  moves each one's ``@champion`` only when its newest version beats it by ``margin`` on the same
  evaluation set (dataset version, split, task) (sarflow.mlops.registry).

Pipeline parameters ``pretrain``, ``embed``, ``downstream`` and ``llp`` take params.yaml's
sections of those names whole, and ``promote.margin`` becomes ``margin`` (``sarflow pipeline
run`` fills them in); each component builds its stage's typed config from them.
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.downstream import report_results, train_llp, train_probes
from components.embed import embed_shards, plan_embed, publish_embeddings
from components.materialize import materialize_features, materialize_part, plan_materialize
from components.pretrain import encoder_reference, pretrain_encoder, pretrain_trainjob
from components.promote import promote_model, publish_champion
from pipelines.platform import exit_task, on_gpu, stage

PIPELINE_NAME = "sarflow-training"
# GPUs of the pretraining task: a compile-time constant (kfp.local cannot resolve a pipeline
# parameter as an accelerator count); with more than one, Lightning trains with DDP on the node
PRETRAIN_GPUS = 1
# the Kubeflow Trainer runtime a pretraining TrainJob runs on by default (k8s/trainer; the library's
# sarflow.training.distributed.TORCH_RUNTIME, which a test compares): a constant, as KFP needs literal defaults
TRAINJOB_RUNTIME = "sarflow-torch-distributed"
# embedding parts (one GPU task each) and materialisation parts run at once: compile-time constants
# (a ParallelFor's parallelism is fixed when the pipeline compiles); how many parts: params embed.parts
EMBED_PARALLELISM = 8
MATERIALIZE_PARALLELISM = 8
# pretrain/embed/downstream/llp: passed whole (the pipeline has inputs of these names); promote: its keys
# become arguments. `features:` is not read: a pipeline's features root and online store are its arguments.
PARAMS_SECTIONS = ("pretrain", "embed", "downstream", "llp", "promote")
# the gate's lock reaches a pod as $SARFLOW_PROMOTION_LOCK (a database URL with credentials: a Secret, not an argument)
PARAMS_NOT_ARGUMENTS = {"promote.lock_uri": "the gate's task reads $SARFLOW_PROMOTION_LOCK from its environment"}
# the gated training tasks: each returns `models`, the JSON map of what it registered
# ({name: {version, metric, higher_is_better}}); which models exist follows the catalog's labels
GATED = ("probes", "llp")


def embedding_stages(store, encoder, *, tracking_uri, features_root, embed, dataset_version,
                     dataset_git_commit) -> dict[str, dsl.PipelineTask]:
    """plan-embed -> ParallelFor over its shard ranges (params `embed.parts`, default 1: one task) of
    embed-shards, one GPU each, each writing its own staged part -> publish-embeddings, which checks
    the parts cover the store once and publishes them as the partition every later task reads (its
    `embeddings` output); `encoder` is the Model channel of the encoder reference."""
    lineage = dict(dataset_version=dataset_version, dataset_git_commit=dataset_git_commit)
    plan = plan_embed(store=store, options=embed)
    stage(plan, "plan-embed", "features", cache=False)
    with dsl.ParallelFor(plan.output, parallelism=EMBED_PARALLELISM, name="embed-parts") as shards:
        part = embed_shards(store=store, encoder=encoder, shards=shards, features_root=features_root,
                            tracking_uri=tracking_uri, options=embed, **lineage)
        on_gpu(stage(part, "embed", "embed", cache=False), 1)
    emb = publish_embeddings(store=store, encoder=encoder, parts=dsl.Collected(part.outputs["Output"]),
                             features_root=features_root)
    stage(emb, "publish-embeddings", "features", cache=False)
    return {"plan-embed": plan, "embed": part, "publish-embeddings": emb}


def feature_stages(embeddings, *, features_root, online, redis, after=None) -> dict[str, dsl.PipelineTask]:
    """Feast apply once (plan-materialize, after `after`), materialisation fanned out over the parts
    (materialize-part each: the incremental state is per source file, so parts never share it), then
    materialize-features: the parts' reports and the similarity index of the published partition."""
    plan = plan_materialize(embeddings=embeddings, features_root=features_root, online=online, redis=redis)
    stage(plan if after is None else plan.after(after), "plan-materialize", "features", cache=False)
    with dsl.ParallelFor(plan.output, parallelism=MATERIALIZE_PARALLELISM, name="materialize-parts") as index:
        part = materialize_part(part=index, features_root=features_root, online=online, redis=redis)
        stage(part, "materialize-part", "features", cache=False)
    mat = materialize_features(embeddings=embeddings, features_root=features_root, online=online, redis=redis,
                               parts=dsl.Collected(part.output))
    stage(mat, "materialize", "features", cache=False)
    return {"plan-materialize": plan, "materialize-part": part, "materialize": mat}


def pretrain_stages(store, *, store_uri=None, tracking_uri, pretrain, trainjob, dataset_version, dataset_git_commit,
                    gpus: int = PRETRAIN_GPUS) -> dict[str, dsl.PipelineTask]:
    """The pretraining switch: dsl.If(trainjob nodes == 0) pretrain-encoder on a GPU node, dsl.Else
    pretrain-trainjob (a CPU task launching a TrainJob of that many nodes and waiting), then
    encoder-reference over dsl.OneOf of their `reference` outputs (its `chosen_encoder` is the encoder
    every later task reads). `trainjob`: the pipeline's (nodes, gpus per node, runtime) channels;
    `store_uri`: the store's URI as a string (the TrainJob branch then leaves the artifact alone)."""
    lineage = dict(dataset_version=dataset_version, dataset_git_commit=dataset_git_commit)
    nodes, gpus_per_node, runtime = trainjob
    with dsl.If(nodes == 0, name="pretrain-in-task"):
        pre = pretrain_encoder(store=store, pretrain=pretrain, tracking_uri=tracking_uri, **lineage)
        on_gpu(stage(pre, "pretrain", "pretrain", cache=True), gpus)
    with dsl.Else(name="pretrain-trainjob"):
        where = {"store": store} if store_uri is None else {"store_uri": store_uri}
        job = pretrain_trainjob(**where, pretrain=pretrain, nodes=nodes, gpus_per_node=gpus_per_node, runtime=runtime,
                                tracking_uri=tracking_uri, **lineage)
        stage(job, "pretrain-trainjob", "launch", cache=True)
    chosen = encoder_reference(reference=dsl.OneOf(pre.outputs["reference"], job.outputs["reference"]))
    stage(chosen, "encoder", "handoff", cache=True, services=False)
    return {"pretrain": pre, "pretrain-trainjob": job, "encoder": chosen}


def training_stages(store, bags, dataset_version, dataset_git_commit, *, tracking_uri, features_root, pretrain, embed,
                    downstream, llp, online, redis, margin, trainjob, store_uri=None,
                    gpus: int = PRETRAIN_GPUS) -> dict[str, dsl.PipelineTask]:
    """Every task after the chip store exists; `store` and `bags` are Dataset channels,
    `dataset_version` and `dataset_git_commit` the store's lineage (channels or pipeline inputs),
    `trainjob` and `store_uri` the pretraining switch's (:func:`pretrain_stages`)."""
    lineage = dict(dataset_version=dataset_version, dataset_git_commit=dataset_git_commit)
    pretrained = pretrain_stages(store, store_uri=store_uri, tracking_uri=tracking_uri, pretrain=pretrain,
                                 trainjob=trainjob, gpus=gpus, **lineage)

    embedded = embedding_stages(store, pretrained["encoder"].outputs["chosen_encoder"], tracking_uri=tracking_uri,
                                features_root=features_root, embed=embed, **lineage)
    embeddings = embedded["publish-embeddings"].outputs["embeddings"]

    bag_task = train_llp(store=store, embeddings=embeddings, bags=bags, features_root=features_root,
                         tracking_uri=tracking_uri, options=llp, **lineage)
    stage(bag_task, "llp", "downstream", cache=False)

    # after LLP: it writes the chip_bags source, so the bags reach Feast with everything else
    featured = feature_stages(embeddings, features_root=features_root, online=online, redis=redis, after=bag_task)
    mat = featured["materialize"]

    probes = train_probes(store=store, embeddings=embeddings, features_root=features_root,
                          tracking_uri=tracking_uri, options=downstream, **lineage)
    stage(probes.after(mat), "probes", "downstream", cache=False)

    report = report_results(tracking_uri=tracking_uri, probes_run_id=probes.outputs["run_id"],
                            llp_run_id=bag_task.outputs["run_id"])
    stage(report, "report", "report", cache=False)

    tasks = {**pretrained, **embedded, **featured, "probes": probes, "llp": bag_task, "report": report}
    for upstream in GATED:
        gate = promote_model(models=tasks[upstream].outputs["models"], margin=margin, tracking_uri=tracking_uri)
        stage(gate, f"promote-{upstream}", "promote", cache=False)
        with dsl.If(gate.outputs["Output"] == True, name=f"promoted-{upstream}"):  # noqa: E712 (a KFP condition)
            publish = publish_champion(decision=gate.outputs["decision"], tracking_uri=tracking_uri)
            stage(publish, f"publish-{upstream}", "promote", cache=False)
        tasks[f"promote-{upstream}"] = gate
    return tasks


@dsl.pipeline(name=PIPELINE_NAME, description="sarflow training: pretrain -> embed -> Feast -> probes + LLP -> promote")
def training_pipeline(
    store_uri: str,
    bags_uri: str,
    dataset_version: str = "",
    dataset_git_commit: str = "",
    tracking_uri: str = "",
    features_root: str = "s3://sarflow-features",
    pretrain: dict = {},
    embed: dict = {},
    downstream: dict = {},
    llp: dict = {},
    online: str = "redis",
    redis: str = "redis.sarflow.svc:6379",
    margin: float = 0.0,
    trainjob_nodes: int = 0,
    trainjob_gpus_per_node: int = 1,
    trainjob_runtime: str = TRAINJOB_RUNTIME,
    failure_log: str = "",
):
    """`trainjob_nodes` > 0 pretrains as a Kubeflow Trainer TrainJob of that many nodes x
    `trainjob_gpus_per_node` GPUs on `trainjob_runtime`, reading `store_uri` (s3://) from every node;
    0 (the default) pretrains in the pipeline's own GPU task."""
    with dsl.ExitHandler(exit_task(failure_log), name="training"):
        store = dsl.importer(artifact_uri=store_uri, artifact_class=Dataset, reimport=False)
        store.set_display_name("chip-store")
        bags = dsl.importer(artifact_uri=bags_uri, artifact_class=Dataset, reimport=False)
        bags.set_display_name("bags")
        training_stages(store.output, bags.output, dataset_version, dataset_git_commit, tracking_uri=tracking_uri,
                        features_root=features_root, pretrain=pretrain, embed=embed, downstream=downstream, llp=llp,
                        online=online, redis=redis, margin=margin, store_uri=store_uri,
                        trainjob=(trainjob_nodes, trainjob_gpus_per_node, trainjob_runtime))


# ---------------------------------------------------------------- the embedding and Feast stages alone

EMBED_PIPELINE_NAME = "sarflow-embed"


@dsl.pipeline(name=EMBED_PIPELINE_NAME, description="sarflow embedding fanned out over shard ranges -> publish -> Feast")
def embed_pipeline(
    store_uri: str,
    encoder_uri: str,
    dataset_version: str = "",
    dataset_git_commit: str = "",
    tracking_uri: str = "",
    features_root: str = "s3://sarflow-features",
    embed: dict = {},
    online: str = "redis",
    redis: str = "redis.sarflow.svc:6379",
):
    """The training pipeline's embedding and Feast stages (the same wiring) on an existing store and
    encoder: `encoder_uri` is an encoder reference as pretrain-encoder writes it (a JSON file with
    `model_uri` and `tracking_uri`); no pretraining, no downstream training."""
    store = dsl.importer(artifact_uri=store_uri, artifact_class=Dataset, reimport=False)
    store.set_display_name("chip-store")
    encoder = dsl.importer(artifact_uri=encoder_uri, artifact_class=Model, reimport=False)
    encoder.set_display_name("encoder")
    embedded = embedding_stages(store.output, encoder.output, tracking_uri=tracking_uri, features_root=features_root,
                                embed=embed, dataset_version=dataset_version, dataset_git_commit=dataset_git_commit)
    feature_stages(embedded["publish-embeddings"].outputs["embeddings"], features_root=features_root, online=online,
                   redis=redis)

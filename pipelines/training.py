"""The training pipeline: pretrain (GPU node) -> embed -> materialize -> probes + LLP ->
promotion gate -> publish the champion, on a chip store that already exists.

```
exit handler (record-status)
├── importer(store_uri)             -> store (Dataset: a chip store folder, or s3:// on a cluster)
├── importer(bags_uri)              -> bags  (Dataset: polygons + statistics table, for LLP)
├── pretrain-encoder(store)         -> encoder (Model: reference to sarflow-encoder-<method>/<v>)   [GPU]
├── embed-chips(store, encoder)     -> embeddings (Dataset: the Feast offline partition written)      [GPU]
├── train-llp(store, embeddings, bags) -> registers sarflow-llp-<label>; writes the chip_bags source
├── materialize-features(embeddings)-> features (Feast apply + streaming materialize + similarity index), after LLP
├── train-probes(store, embeddings) -> registers sarflow-<task> per evaluable task (after materialize: Feast training sets)
├── report-results(probes, llp)     -> one MLflow results-report run (tables + plots), its HTML in the UI
└── for probes and LLP: promote-model (every model it registered) -> dsl.If(any promoted) -> publish-champion
```

The same stages follow the data plane in the end-to-end pipeline (pipelines/e2e.py):
:func:`training_stages` builds them once for both.

- **GPU**: pretraining (``PRETRAIN_GPUS``) and embedding (one) request ``nvidia.com/gpu``, select the GPU
  pool's nodes and tolerate its taint (pipelines/platform.py);
- **images**: the GPU tasks run docker/Dockerfile.gpu's image (``components.GPU_IMAGE``), the
  others the CPU image; both carry their code commit (``SARFLOW_CODE_COMMIT``);
- **lineage by value**: ``dataset_version`` and ``dataset_git_commit`` (the version task's
  ``dvc_md5`` and ``git_commit``, or the pipeline's arguments) go to every task that makes a run
  or a partition (pretrain, embed, probes, LLP), which records them: a fresh pod has no DVC
  repository to rediscover them from;
- **caching**: only pretraining caches, and its key includes ``dataset_version`` (the store's
  DVC md5), so a new dataset version always retrains; everything after it writes shared state
  (Feast, the registry) and always runs;
- **promotion**: each task in ``GATED`` returns the models it registered with their metric and
  direction (tasks come from the catalog's labels, so the pipeline cannot name them); the gate
  moves each one's ``@champion`` only when its newest version beats it by ``margin`` on the same
  evaluation set (dataset version, split, task) (sarflow.mlops.registry).

Pipeline parameters ``pretrain``, ``embed``, ``downstream`` and ``llp`` take params.yaml's
sections of those names whole, and ``promote.margin`` becomes ``margin`` (``sarflow pipeline
run`` fills them in); each component builds its stage's typed config from them.
"""

from kfp import dsl
from kfp.dsl import Dataset

from components.downstream import report_results, train_llp, train_probes
from components.embed import embed_chips
from components.materialize import materialize_features
from components.pretrain import pretrain_encoder
from components.promote import promote_model, publish_champion
from pipelines.platform import exit_task, on_gpu, stage

PIPELINE_NAME = "sarflow-training"
# GPUs of the pretraining task: a compile-time constant (kfp.local cannot resolve a pipeline
# parameter as an accelerator count); with more than one, Lightning trains with DDP on the node
PRETRAIN_GPUS = 1
# pretrain/embed/downstream/llp: passed whole (the pipeline has inputs of these names); promote: its keys
# become arguments. `features:` is not read: a pipeline's features root and online store are its arguments.
PARAMS_SECTIONS = ("pretrain", "embed", "downstream", "llp", "promote")
# the gate's lock reaches a pod as $SARFLOW_PROMOTION_LOCK (a database URL with credentials: a Secret, not an argument)
PARAMS_NOT_ARGUMENTS = {"promote.lock_uri": "the gate's task reads $SARFLOW_PROMOTION_LOCK from its environment"}
# the gated training tasks: each returns `models`, the JSON map of what it registered
# ({name: {version, metric, higher_is_better}}); which models exist follows the catalog's labels
GATED = ("probes", "llp")


def training_stages(store, bags, dataset_version, dataset_git_commit, *, tracking_uri, features_root, pretrain, embed,
                    downstream, llp, online, redis, margin, gpus: int = PRETRAIN_GPUS) -> dict[str, dsl.PipelineTask]:
    """Every task after the chip store exists; `store` and `bags` are Dataset channels,
    `dataset_version` and `dataset_git_commit` the store's lineage (channels or pipeline inputs)."""
    lineage = dict(dataset_version=dataset_version, dataset_git_commit=dataset_git_commit)
    pre = pretrain_encoder(store=store, pretrain=pretrain, tracking_uri=tracking_uri, **lineage)
    on_gpu(stage(pre, "pretrain", "pretrain", cache=True), gpus)

    emb = embed_chips(store=store, encoder=pre.outputs["encoder"], features_root=features_root,
                      tracking_uri=tracking_uri, options=embed, **lineage)
    on_gpu(stage(emb, "embed", "embed", cache=False), 1)

    bag_task = train_llp(store=store, embeddings=emb.outputs["embeddings"], bags=bags, features_root=features_root,
                         tracking_uri=tracking_uri, options=llp, **lineage)
    stage(bag_task, "llp", "downstream", cache=False)

    # after LLP: it writes the chip_bags source, so the bags reach Feast with everything else
    mat = materialize_features(embeddings=emb.outputs["embeddings"], features_root=features_root,
                               online=online, redis=redis)
    stage(mat.after(bag_task), "materialize", "features", cache=False)

    probes = train_probes(store=store, embeddings=emb.outputs["embeddings"], features_root=features_root,
                          tracking_uri=tracking_uri, options=downstream, **lineage)
    stage(probes.after(mat), "probes", "downstream", cache=False)

    report = report_results(tracking_uri=tracking_uri, probes_run_id=probes.outputs["run_id"],
                            llp_run_id=bag_task.outputs["run_id"])
    stage(report, "report", "report", cache=False)

    tasks = {"pretrain": pre, "embed": emb, "materialize": mat, "probes": probes, "llp": bag_task, "report": report}
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
    failure_log: str = "",
):
    with dsl.ExitHandler(exit_task(failure_log), name="training"):
        store = dsl.importer(artifact_uri=store_uri, artifact_class=Dataset, reimport=False)
        store.set_display_name("chip-store")
        bags = dsl.importer(artifact_uri=bags_uri, artifact_class=Dataset, reimport=False)
        bags.set_display_name("bags")
        training_stages(store.output, bags.output, dataset_version, dataset_git_commit, tracking_uri=tracking_uri,
                        features_root=features_root, pretrain=pretrain, embed=embed, downstream=downstream, llp=llp,
                        online=online, redis=redis, margin=margin)

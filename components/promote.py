"""Components `promote-model` and `publish-champion`: the registry's promotion gate, and what
happens when it promotes.

`promote-model` wraps :func:`sarflow.mlops.registry.promote` (the version the task registered vs ``@champion`` on the
same evaluation set and dataset version, by a margin) for every model a training task
registered, and returns whether it promoted any, so the pipeline can branch on it with
``dsl.If``. `publish-champion` runs only in that branch: for each promoted model it loads
``models:/<name>@champion`` through MLflow's generic pyfunc loader, predicts the model's own
input example as a smoke check, and writes a model card (JSON).
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def promote_model(
    decision: Output[Artifact],
    models: str = "",
    name: str = "",
    metric: str = "",
    higher_is_better: bool = True,
    margin: float = 0.0,
    tracking_uri: str = "",
) -> bool:
    """The promotion gate; returns whether it promoted any model (the decision artifact holds
    one record per model). `models` is what a training task registered, as JSON
    ``{name: {"version", "metric", "higher_is_better"}}`` (the models a run registers depend on
    the labels its catalog declares, so the pipeline cannot name them); or one `name` with its
    `metric`. The gate judges the version the training task registered (a bare `name`: its
    newest), under the lock of `promote.lock_uri` / $SARFLOW_PROMOTION_LOCK. A single unnamed output on
    purpose: kfp.local resolves a condition on a task's `Output`, not on a named output."""
    import json
    from pathlib import Path

    import mlflow

    from components.paths import absolute_uri
    from sarflow.mlops.registry import PromoteConfig, promote
    from sarflow.params import Params, stage_config

    tracking_uri = absolute_uri(tracking_uri)
    cfg = stage_config(PromoteConfig, Params({"promote": {"margin": margin, "tracking_uri": tracking_uri or None}},
                                             "promote-model parameters"), "promote")
    mlflow.set_tracking_uri(cfg.tracking_uri)
    gated = json.loads(models) if models else {}
    if name:
        gated[name] = {"metric": metric, "higher_is_better": bool(higher_is_better)}
    records = []
    for model, spec in sorted(gated.items()):
        d = promote(model, spec["metric"], higher_is_better=bool(spec["higher_is_better"]), margin=cfg.margin,
                    version=spec.get("version"), lock_uri=cfg.lock_uri)
        champion = d.champion_after or ""  # read under the gate's lock, not after another gate moved it
        records.append({"model": model, "metric": spec["metric"], "promoted": d.promoted, "challenger": d.challenger,
                        "previous_champion": d.champion, "champion": champion, "reasons": d.reasons,
                        "challenger_metric": d.challenger_metric, "champion_metric": d.champion_metric})
    promoted = [r["model"] for r in records if r["promoted"]]
    Path(decision.path).parent.mkdir(parents=True, exist_ok=True)
    Path(decision.path).write_text(json.dumps({"models": records, "promoted": promoted}, indent=1))
    decision.metadata.update({"gated": [r["model"] for r in records], "promoted": promoted})
    return bool(promoted)


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def publish_champion(decision: Input[Artifact], card: Output[Artifact], tracking_uri: str = ""):
    """Loads `models:/<name>@champion` of every model the gate promoted, predicts its input
    example, writes the model cards (JSON, one record per model)."""
    import json
    from pathlib import Path

    import mlflow
    import numpy as np

    from components.paths import absolute_uri
    from sarflow.params import default_tracking_uri

    mlflow.set_tracking_uri(absolute_uri(tracking_uri or default_tracking_uri()))
    records = []
    for name in json.loads(Path(decision.path).read_text())["promoted"]:
        uri = f"models:/{name}@champion"
        model = mlflow.pyfunc.load_model(uri)
        example = model.input_example
        prediction = np.asarray(model.predict(np.asarray(example, dtype=np.float32)))
        mv = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
        records.append({"model_uri": uri, "version": str(mv.version), "run_id": mv.run_id,
                        "signature": str(model.metadata.signature), "prediction_shape": list(prediction.shape),
                        "tags": dict(mv.tags)})
    Path(card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(card.path).write_text(json.dumps({"models": records}, indent=1, default=str))
    card.metadata.update({"published": [r["model_uri"] for r in records]})

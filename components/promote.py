"""Components `promote-model` and `publish-champion`: the registry's promotion gate, and what
happens when it promotes.

`promote-model` wraps :func:`sarflow.mlops.registry.promote` (newest version vs ``@champion`` on the
same evaluation set and dataset version, by a margin) and returns the decision as output
parameters, so the pipeline can branch on it with ``dsl.If``. `publish-champion` runs only
in that branch: it loads ``models:/<name>@champion`` through MLflow's generic pyfunc loader,
predicts the model's own input example as a smoke check, and writes a model card (JSON).
"""

from kfp import dsl
from kfp.dsl import Artifact, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def promote_model(
    decision: Output[Artifact],
    name: str,
    metric: str,
    higher_is_better: bool = True,
    margin: float = 0.0,
    tracking_uri: str = "",
    trained_version: str = "",
) -> bool:
    """The promotion gate; returns whether it promoted (the decision artifact holds the rest).
    `trained_version` (the version the upstream task registered) only orders this task after
    it; the gate always judges the newest version. A single unnamed output on purpose:
    kfp.local resolves a condition on a task's `Output`, not on a named output."""
    import json
    from pathlib import Path

    import mlflow

    from sarflow.mlops.registry import PromoteConfig, promote
    from sarflow.params import Params, stage_config

    cfg = stage_config(PromoteConfig, Params({"promote": {"margin": margin, "tracking_uri": tracking_uri or None}},
                                             "promote-model parameters"), "promote")
    mlflow.set_tracking_uri(cfg.tracking_uri)
    d = promote(name, metric, higher_is_better=bool(higher_is_better), margin=cfg.margin)
    champion = str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version) \
        if d.promoted or d.champion else ""
    record = {"model": name, "metric": metric, "promoted": d.promoted, "challenger": d.challenger,
              "previous_champion": d.champion, "champion": champion, "reasons": d.reasons,
              "challenger_metric": d.challenger_metric, "champion_metric": d.champion_metric}
    Path(decision.path).parent.mkdir(parents=True, exist_ok=True)
    Path(decision.path).write_text(json.dumps(record, indent=1))
    decision.metadata.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
    return bool(d.promoted)


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def publish_champion(card: Output[Artifact], name: str, tracking_uri: str = ""):
    """Loads `models:/<name>@champion`, predicts its input example, writes a model card."""
    import json
    from pathlib import Path

    import mlflow
    import numpy as np

    from sarflow.params import default_tracking_uri

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    uri = f"models:/{name}@champion"
    model = mlflow.pyfunc.load_model(uri)
    example = model.input_example
    prediction = np.asarray(model.predict(np.asarray(example, dtype=np.float32)))
    mv = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    record = {"model_uri": uri, "version": str(mv.version), "run_id": mv.run_id,
              "signature": str(model.metadata.signature), "prediction_shape": list(prediction.shape),
              "tags": dict(mv.tags)}
    Path(card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(card.path).write_text(json.dumps(record, indent=1, default=str))
    card.metadata.update({"model_uri": uri, "version": str(mv.version)})

"""MLflow conventions: where runs go, their metrics as flat names, the requirements logged
with every model (the lineage they carry is :mod:`sarflow.mlops.lineage`)."""

from __future__ import annotations

from pathlib import Path

def setup_mlflow(tracking_uri: str | None, experiment: str) -> str:
    """Points MLflow at the tracking URI (None or empty: `default_tracking_uri()`) and returns the
    experiment id. With a sqlite:/// backend the artifacts go in `mlartifacts/` beside the
    database (the embedded default)."""
    import mlflow

    from sarflow.params import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested result dict as flat metric names (`a_b_c`), e.g. for
    KFP Metrics artifacts and MLflow; strings, lists and non-finite values are left out."""
    import math

    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def model_requirements() -> list[str]:
    """The pip requirements logged with every sarflow model: pinned to what is installed here.
    Given explicitly, MLflow skips inferring them (which re-imports the model in a subprocess
    and takes ~15 s per model)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "numpy", "scikit-learn", "sarflow"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out


def loggable_params(params: dict) -> dict[str, str]:
    """A stage's parameters as MLflow run parameters: the tracking URI left out (where a run is
    logged is not a parameter of it) and any user:password in a URI value masked, so a credential
    in a database or server URL never lands in the tracking store; values cut to 500 characters."""
    import re

    masked = {k: re.sub(r"(\w+://[^:/@\s]+):[^@\s]+@", r"\1:***@", str(v)) for k, v in params.items() if k != "tracking_uri"}
    return {k: v[:500] for k, v in masked.items()}

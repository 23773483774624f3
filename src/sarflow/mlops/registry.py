"""The promotion gate of the MLflow model registry.

`promote(name)` compares the newest version of a registered model with the current
`@champion` on the same evaluation set and dataset version, and moves `@champion` only if the
challenger is better by `margin` and every check passes: the metric is present and finite,
the dataset version and evaluation set are the champion's, and the input signature is
compatible. The old champion becomes `@previous`; the decision and its reasons are recorded
as tags on the challenger. Promotions of one model are serialised by a lock, and `@champion`
is only ever moved (never removed), so a model never has two champions or none.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from pydantic.dataclasses import dataclass as config_dataclass

from sarflow.errors import InputError
from sarflow.params import STAGE_CONFIG, default_tracking_uri

CHAMPION, PREVIOUS = "champion", "previous"
DATASET_TAG, EVAL_TAG = "sarflow.dataset_dvc_md5", "sarflow.eval_set"


@config_dataclass(config=STAGE_CONFIG)
class PromoteConfig:
    """params.yaml's `promote:` section: the gate's margin (a challenger must beat @champion by
    more than this) and the tracking server. The metric and its direction are per model."""

    margin: float = 0.0
    tracking_uri: str = field(default_factory=default_tracking_uri)


@dataclass
class Decision:
    model: str
    challenger: str
    champion: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    challenger_metric: float | None = None
    champion_metric: float | None = None

    def as_tags(self) -> dict[str, str]:
        return {"sarflow.promotion.decision": "promoted" if self.promoted else "rejected",
                "sarflow.promotion.reasons": "; ".join(self.reasons)[:4900],
                "sarflow.promotion.compared_to": self.champion or "none",
                "sarflow.promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _metric(client, mv, metric: str) -> float | None:
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    tag = mv.tags.get(f"sarflow.metric.{metric}")
    return float(tag) if tag is not None else None


def _signature_inputs(mv):
    from mlflow.models import get_model_info

    sig = get_model_info(f"models:/{mv.name}/{mv.version}").signature
    return None if sig is None else sig.inputs.to_dict()


def _lock_path(tracking_uri: str, name: str, lock_dir: str | Path | None) -> Path:
    if lock_dir is None:
        # beside a SQLite registry; for a tracking server, this machine's temp folder: the lock
        # serialises promotions started on this machine (run the gate from one place per model)
        lock_dir = (Path(tracking_uri[len("sqlite:///"):]).parent if tracking_uri.startswith("sqlite:///")
                    else Path(tempfile.gettempdir()))
    return Path(lock_dir) / f".promote-{name}.lock"


def promote(name: str, metric: str, higher_is_better: bool = True, margin: float = 0.0,
            lock_dir: str | Path | None = None) -> Decision:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    with FileLock(str(_lock_path(mlflow.get_tracking_uri(), name, lock_dir)), timeout=120):
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except MlflowException as e:
            raise InputError(name, f"not a registered model ({e.error_code})") from None
        if not versions:
            raise InputError(name, "the registered model has no versions")
        challenger = max(versions, key=lambda v: int(v.version))
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        d = Decision(model=name, challenger=str(challenger.version),
                     champion=str(champion.version) if champion else None, promoted=False)
        d.challenger_metric = _metric(client, challenger, metric)
        if d.challenger_metric is None or not math.isfinite(d.challenger_metric):
            d.reasons.append(f"challenger v{challenger.version} has no finite {metric!r}")
        if champion is not None and str(champion.version) == str(challenger.version):
            d.reasons.append(f"v{challenger.version} already is the champion")
        elif champion is not None:
            d.champion_metric = _metric(client, champion, metric)
            for tag, what in ((DATASET_TAG, "dataset version"), (EVAL_TAG, "evaluation set")):
                if champion.tags.get(tag) != challenger.tags.get(tag):
                    d.reasons.append(f"{what} differs: champion {champion.tags.get(tag)}, challenger {challenger.tags.get(tag)}")
            if _signature_inputs(champion) != _signature_inputs(challenger):
                d.reasons.append("input signature differs from the champion's")
            if not d.reasons and d.champion_metric is not None and math.isfinite(d.champion_metric):
                gain = (d.challenger_metric - d.champion_metric) * (1 if higher_is_better else -1)
                if gain <= margin:
                    d.reasons.append(f"{metric} {d.challenger_metric:.6g} is not better than the champion's "
                                     f"{d.champion_metric:.6g} by more than {margin}")
        d.promoted = not d.reasons
        if d.promoted:
            d.reasons.append(f"{metric} {d.challenger_metric:.6g}" + (
                f" beats {d.champion_metric:.6g} by more than {margin}" if champion else " (first champion)"))
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion.version)
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
        for k, v in d.as_tags().items():
            client.set_model_version_tag(name, challenger.version, k, v)
        return d

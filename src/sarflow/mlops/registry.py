"""The promotion gate of the MLflow model registry.

`promote(name)` compares a version of a registered model (the one a pipeline registered; by default the
newest) with the current
`@champion` on the same evaluation set and dataset version, and moves `@champion` only if the
challenger is better by `margin` and every check passes: the metric is present and finite,
the dataset version and evaluation set are the champion's, and the input signature is
compatible. The old champion becomes `@previous`; the decision and its reasons are recorded
as tags on the challenger. A champion without the metric is "incomparable" (nothing moves; the
reason says how to promote by hand); a rerun when the newest version already is the champion
writes nothing, so the champion keeps the record of its promotion. An http(s) tracking server
is probed first (5 s) so an unreachable one fails fast, naming it. Promotions of one model are
serialised by a lock that spans pods when it lives in PostgreSQL (`sarflow.mlops.locks`), every
decision is appended to the registered model's history tag, and `@champion` is only ever moved
(never removed), so a model never has two champions or none.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic.dataclasses import dataclass as config_dataclass

from sarflow.errors import InputError
from sarflow.mlops.locks import promotion_lock
from sarflow.params import STAGE_CONFIG, default_tracking_uri, environ

CHAMPION, PREVIOUS = "champion", "previous"
DATASET_TAG, EVAL_TAG = "sarflow.dataset_dvc_md5", "sarflow.eval_set"


@config_dataclass(config=STAGE_CONFIG)
class PromoteConfig:
    """params.yaml's `promote:` section: the gate's margin (a challenger must beat @champion by
    more than this) and the tracking server. The metric and its direction are per model."""

    margin: float = 0.0
    tracking_uri: str = field(default_factory=default_tracking_uri)
    # where the gates' lock lives (sarflow.mlops.locks): postgresql://... spans pods; null:
    # $SARFLOW_PROMOTION_LOCK, else beside the registry (one machine)
    lock_uri: str | None = None


@dataclass
class Decision:
    model: str
    challenger: str
    champion: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    challenger_metric: float | None = None
    champion_metric: float | None = None
    # "promoted", "rejected", "incomparable" (the champion has no value for the metric: nothing is
    # moved and `sarflow promote` exits non-zero) or "already the champion" (nothing is written)
    outcome: str = "rejected"
    champion_after: str | None = None  # @champion when the gate let go of the lock

    def as_tags(self) -> dict[str, str]:
        return {"sarflow.promotion.decision": self.outcome,
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


PROBE_TIMEOUT_S = 5.0


def _check_reachable(tracking_uri: str) -> None:
    """Fails fast, naming the server, when an http(s) tracking server cannot be reached (without
    this, MLflow retries for ~4 minutes and the gate then blames the model name)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        raise InputError(tracking_uri, f"cannot reach the tracking server ({type(e).__name__}); check "
                         "--tracking-uri / params promote.tracking_uri and that the server is up") from None


def _few_retries():
    """MLflow's HTTP retries (7, exponential backoff: ~4 minutes) lowered for the gate's calls,
    unless set by the user."""
    return environ({k: os.environ.get(k, v) for k, v in _RETRY_ENV.items()})


_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def promote(name: str, metric: str, higher_is_better: bool = True, margin: float = 0.0,
            version: str | int | None = None, lock_uri: str | None = None) -> Decision:
    """Judges `version` (default: the newest) of `name` against `@champion`. A pipeline passes the
    version it registered, so two pipelines gating at once each judge their own model."""
    import mlflow

    tracking_uri = mlflow.get_tracking_uri()
    _check_reachable(tracking_uri)
    with _few_retries(), promotion_lock(name, tracking_uri, lock_uri):
        return _promote(mlflow.MlflowClient(), tracking_uri, name, metric, higher_is_better, margin, version)


HISTORY_TAG, HISTORY_CHARS = "sarflow.promotion.history", 4900


def _record_history(client, name: str, d: Decision) -> None:
    """Appends the decision to the registered model's history tag (newest last; the oldest entries
    are dropped to fit a tag), so moves of @champion stay on record after later gates."""
    import json

    model = client.get_registered_model(name)
    history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    history.append({"at": d.as_tags()["sarflow.promotion.at"], "version": d.challenger, "outcome": d.outcome,
                    "champion_before": d.champion, "metric": d.challenger_metric})
    while len(json.dumps(history)) > HISTORY_CHARS and len(history) > 1:
        history.pop(0)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _promote(client, tracking_uri: str, name: str, metric: str, higher_is_better: bool, margin: float,
             version: str | int | None = None) -> Decision:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise InputError(name, f"not a registered model ({e.error_code})") from None
        raise InputError(tracking_uri, f"the tracking server failed to list {name!r}: {e.message}") from None
    if not versions:
        raise InputError(name, "the registered model has no versions")
    if version is None:
        challenger = max(versions, key=lambda v: int(v.version))
    else:
        challenger = next((v for v in versions if str(v.version) == str(version)), None)
        if challenger is None:
            raise InputError(name, f"has no version {version} (versions: "
                             f"{', '.join(sorted((str(v.version) for v in versions), key=int))})")
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
        # a rerun of the gate: the champion's tags keep the record of its promotion
        d.reasons = [f"v{challenger.version} already is the champion"]
        d.outcome = "already the champion"
        d.champion_after = d.champion
        return d
    if champion is not None:
        d.champion_metric = _metric(client, champion, metric)
        if d.champion_metric is None or not math.isfinite(d.champion_metric):
            d.reasons.append(f"the champion v{champion.version} has no finite {metric!r}: cannot compare; "
                             f"promote by hand with MlflowClient().set_registered_model_alias("
                             f"{name!r}, 'champion', '{challenger.version}')")
            if d.challenger_metric is not None and math.isfinite(d.challenger_metric):
                d.outcome = "incomparable"
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
        d.outcome = "promoted"
        d.reasons.append(f"{metric} {d.challenger_metric:.6g}" + (
            f" beats {d.champion_metric:.6g} by more than {margin}" if champion else " (first champion)"))
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    for k, v in d.as_tags().items():
        client.set_model_version_tag(name, challenger.version, k, v)
    d.champion_after = d.challenger if d.promoted else d.champion
    _record_history(client, name, d)
    return d


# --- the one rule of every command's --model (and of the model references of params and pipelines)

MODEL_RULE = ("a registered model: models:/NAME/VERSION, models:/NAME@ALIAS (the version the alias points at), "
              "or a bare NAME (its newest version)")


@dataclass(frozen=True)
class ModelSpec:
    """A model reference as written: NAME and at most one of VERSION and ALIAS."""
    name: str
    version: str | None = None
    alias: str | None = None


def parse_model_ref(text: str) -> ModelSpec:
    """`models:/NAME/VERSION`, `models:/NAME@ALIAS` or a bare `NAME` -> its parts (syntax only,
    no registry); anything else is an InputError naming the reference and the rule."""
    ref = (text or "").strip()
    bad = InputError(text or "--model", f"not a model reference: use {MODEL_RULE}")
    if ref.startswith("models:/"):
        rest = ref[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            if not name or not alias or "/" in name or "/" in alias:
                raise bad
            return ModelSpec(name, alias=alias)
        name, _, version = rest.partition("/")
        if not name or not version.isdigit():
            raise bad
        return ModelSpec(name, version=str(int(version)))
    if not ref or ":" in ref or "/" in ref or "@" in ref:
        raise bad
    return ModelSpec(ref)


def resolve_model_ref(text: str, tracking_uri: str | None = None, newest_in_registry: bool = True,
                      client=None) -> tuple[str, str | None]:
    """(NAME, VERSION) of a model reference under :data:`MODEL_RULE`. `models:/NAME/VERSION` needs
    no registry; an alias is looked up in the registry at `tracking_uri` (default: MLflow's); a
    bare NAME is its newest registered version, or, with `newest_in_registry=False` (a command
    that reads what a model already produced, e.g. embeddings under a features root), (NAME, None):
    the newest version the caller has at hand. A name, version or alias the registry lacks is an
    InputError naming the reference and the registry."""
    spec = parse_model_ref(text)
    if spec.version is not None:
        return spec.name, spec.version
    if spec.alias is None and not newest_in_registry:
        return spec.name, None
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient(tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    try:
        if spec.alias is not None:
            return spec.name, str(client.get_model_version_by_alias(spec.name, spec.alias).version)
        versions = client.search_model_versions(f"name='{spec.name}'")
    except MlflowException as e:
        raise InputError(text, f"no such model in the MLflow registry at {where} ({e.error_code})") from None
    if not versions:
        raise InputError(text, f"no such model in the MLflow registry at {where} (no version registered under this name)")
    return spec.name, str(max(int(v.version) for v in versions))

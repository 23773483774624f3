"""The promotion gate against a real MLflow registry (sqlite backend)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sarflow.errors import InputError
from sarflow.mlops.registry import promote

NAME = "sarflow-landcover"


@pytest.fixture
def registry(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("gate")
    return mlflow.MlflowClient()


def _register(score: float, dataset: str = "md5-a", features: int = 4, eval_set: str = "test-v1") -> str:
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0 if score != score else int(score * 1000))
    x = rng.normal(size=(40, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    with mlflow.start_run():
        mlflow.log_metric("macro_f1", score)
        info = mlflow.sklearn.log_model(model, name="model", signature=infer_signature(x, model.predict(x)),
                                        input_example=x[:2], registered_model_name=NAME)
    client = mlflow.MlflowClient()
    v = info.registered_model_version
    client.set_model_version_tag(NAME, v, "sarflow.dataset_dvc_md5", dataset)
    client.set_model_version_tag(NAME, v, "sarflow.eval_set", eval_set)
    return str(v)


def _champion(client):
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_first_better_worse_and_tie(registry):
    v1 = _register(0.70)
    assert promote(NAME, "macro_f1", margin=0.01).promoted and _champion(registry) == v1
    v2 = _register(0.60)  # worse
    d = promote(NAME, "macro_f1", margin=0.01)
    assert not d.promoted and _champion(registry) == v1 and "not better" in d.reasons[0]
    assert registry.get_model_version(NAME, v2).tags["sarflow.promotion.decision"] == "rejected"
    _register(0.705)  # better, but within the margin: a tie
    assert not promote(NAME, "macro_f1", margin=0.01).promoted and _champion(registry) == v1
    v4 = _register(0.80)
    d = promote(NAME, "macro_f1", margin=0.01)
    assert d.promoted and _champion(registry) == v4
    assert str(registry.get_model_version_by_alias(NAME, "previous").version) == v1
    assert registry.get_model_version(NAME, v4).tags["sarflow.promotion.compared_to"] == v1


def test_other_dataset_version_eval_set_or_signature_is_refused(registry):
    _register(0.70)
    promote(NAME, "macro_f1")
    _register(0.90, dataset="md5-b")
    d = promote(NAME, "macro_f1")
    assert not d.promoted and "dataset version differs" in d.reasons[0]
    _register(0.91, eval_set="test-v2")
    assert "evaluation set differs" in promote(NAME, "macro_f1").reasons[0]
    _register(0.92, features=5)
    assert "signature" in " ".join(promote(NAME, "macro_f1").reasons)


def test_missing_or_nan_metric_is_refused(registry):
    _register(0.70)
    promote(NAME, "macro_f1")
    _register(float("nan"))
    d = promote(NAME, "macro_f1")
    assert not d.promoted and "no finite" in d.reasons[0]
    with pytest.raises(InputError):
        promote("sarflow-nothing", "macro_f1")


def test_concurrent_promotions_leave_exactly_one_champion(registry):
    import mlflow

    _register(0.50)
    promote(NAME, "macro_f1")
    _register(0.60)
    _register(0.70)
    results, errors = [], []

    def run():
        try:
            results.append(promote(NAME, "macro_f1"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.promoted for r in results) == 1  # serialised: the first promotes, the rest see it is champion
    champion = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "3"


def test_champion_loads_and_predicts(registry):
    import mlflow

    _register(0.7)
    promote(NAME, "macro_f1")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    pred = model.predict(np.zeros((3, 4), dtype=np.float32))
    assert len(pred) == 3

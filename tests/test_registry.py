"""The promotion gate against a real MLflow registry (sqlite backend)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sarflow.errors import InputError
from sarflow.mlops.registry import promote
from sarflow.mlops.tracking import model_requirements

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
                                        input_example=x[:2], registered_model_name=NAME,
                                        pip_requirements=model_requirements())  # not inferred: ~15 s a model
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


def _encoder_probe(encoder: str, task: str, score: float, metric: str, dataset: str = "md5-a") -> str:
    """A probe on one encoder's embeddings (16-d), logged and registered as the probes stage
    does: `log_downstream_model` with the evaluation set `<dataset>:test:<task>`."""
    import mlflow
    from sklearn.linear_model import LogisticRegression, Ridge

    from sarflow.downstream.models import evaluation_set, log_downstream_model

    rng = np.random.default_rng(abs(hash(encoder)) % 2**32)
    x = rng.normal(size=(60, 16)).astype(np.float32)  # this encoder's embeddings
    model = (LogisticRegression().fit(x, (x[:, 0] > 0).astype(int)) if metric == "test_macro_f1"
             else Ridge().fit(x, x[:, 0]))
    lineage = {"sarflow.dataset_dvc_md5": dataset, "sarflow.catalog_hash": "cat"}
    with mlflow.start_run(run_name=f"probe-{task}", tags={"sarflow.embeddings_model": encoder}):
        info = log_downstream_model(model, f"sarflow-{task}", x[:5], lineage=lineage,
                                    eval_set=evaluation_set(dataset, "test", task), metrics={metric: score})
    return info["version"]


def test_a_better_encoders_probe_is_promoted_and_a_worse_one_is_not(registry):
    """Issue 12 item 6: the evaluation set names the dataset, split and task, not the encoder, so
    probes of different encoders on one dataset are compared (before, every encoder's probe was
    refused for an evaluation set that differed)."""
    name = "sarflow-worldcover"
    v1 = _encoder_probe("sarflow-encoder-mae", "worldcover", 0.70, "test_macro_f1")
    assert promote(name, "test_macro_f1").promoted
    v2 = _encoder_probe("sarflow-encoder-dino", "worldcover", 0.80, "test_macro_f1")  # a better encoder
    d = promote(name, "test_macro_f1")
    assert d.promoted and d.reasons == ["test_macro_f1 0.8 beats 0.7 by more than 0.0"], d.reasons
    mv = registry.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == v2 and mv.tags["sarflow.eval_set"] == "md5-a:test:worldcover"
    assert str(registry.get_model_version_by_alias(name, "previous").version) == v1
    _encoder_probe("sarflow-encoder-clip", "worldcover", 0.75, "test_macro_f1")  # a worse one
    d = promote(name, "test_macro_f1")
    assert not d.promoted and d.reasons == ["test_macro_f1 0.75 is not better than the champion's 0.8 by more than 0.0"]
    assert _champion_of(registry, name) == v2


def test_lower_is_better_and_another_dataset_version(registry):
    name = "sarflow-vegetation"
    _encoder_probe("sarflow-encoder-mae", "vegetation", 12.0, "test_rmse")
    assert promote(name, "test_rmse", higher_is_better=False).promoted
    better = _encoder_probe("sarflow-encoder-dino", "vegetation", 9.5, "test_rmse")
    assert promote(name, "test_rmse", higher_is_better=False).promoted and _champion_of(registry, name) == better
    _encoder_probe("sarflow-encoder-clip", "vegetation", 11.0, "test_rmse")
    assert not promote(name, "test_rmse", higher_is_better=False).promoted
    # a probe scored on another version of the data is never compared, however good
    _encoder_probe("sarflow-encoder-clip", "vegetation", 1.0, "test_rmse", dataset="md5-b")
    d = promote(name, "test_rmse", higher_is_better=False)
    assert not d.promoted and any("dataset version differs" in r for r in d.reasons)
    assert any("evaluation set differs: champion md5-a:test:vegetation, challenger md5-b:test:vegetation" in r
               for r in d.reasons)
    assert _champion_of(registry, name) == better


def test_evaluation_set_format():
    from sarflow.downstream.models import evaluation_set

    assert evaluation_set("abc.dir", "test", "worldcover_presence") == "abc.dir:test:worldcover_presence"
    with pytest.raises(ValueError, match="task"):
        evaluation_set("abc", "test", "")
    with pytest.raises(ValueError, match="dataset version"):
        evaluation_set("a:b", "test", "t")


def _champion_of(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_unversioned_stores_are_told_apart_by_their_catalog():
    """A store DVC does not track is named by its catalog hash in the evaluation set, so the gate
    never compares probes of two different unversioned stores as if they were one dataset."""
    from sarflow.downstream.models import dataset_id, evaluation_set

    a = {"sarflow.dataset_dvc_md5": "untracked", "sarflow.catalog_hash": "a" * 64}
    b = {"sarflow.dataset_dvc_md5": "untracked", "sarflow.catalog_hash": "b" * 64}
    assert dataset_id(a) == "catalog-" + "a" * 16
    assert evaluation_set(dataset_id(a), "test", "flood") != evaluation_set(dataset_id(b), "test", "flood")
    assert dataset_id({**a, "sarflow.dataset_dvc_md5": "0123.dir"}) == "0123.dir"


def test_a_champion_without_the_metric_is_incomparable_not_a_crash(registry):
    """Issue 16: a champion with no value for the metric used to crash the gate (TypeError)."""
    v1 = _register(0.70)
    promote(NAME, "macro_f1")
    v2 = _register(0.80)
    registry.set_model_version_tag(NAME, v2, "sarflow.metric.accuracy", "0.9")  # only the challenger has it
    d = promote(NAME, "accuracy")
    assert not d.promoted and d.outcome == "incomparable" and _champion(registry) == v1
    assert d.reasons[0].startswith(f"the champion v{v1} has no finite 'accuracy': cannot compare; promote by hand")
    tags = registry.get_model_version(NAME, v2).tags
    assert tags["sarflow.promotion.decision"] == "incomparable" and "cannot compare" in tags["sarflow.promotion.reasons"]


def test_a_challenger_without_the_metric_is_rejected(registry):
    v1 = _register(0.70)
    registry.set_model_version_tag(NAME, v1, "sarflow.metric.accuracy", "0.8")
    promote(NAME, "accuracy")
    v2 = _register(0.80)  # no accuracy
    d = promote(NAME, "accuracy")
    assert not d.promoted and d.outcome == "rejected" and _champion(registry) == v1
    assert d.reasons == [f"challenger v{v2} has no finite 'accuracy'"]


def test_cli_exits_non_zero_when_the_champion_has_no_metric(registry, tmp_path):
    import mlflow
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    _register(0.70)
    promote(NAME, "macro_f1")
    v2 = _register(0.80)
    registry.set_model_version_tag(NAME, v2, "sarflow.metric.accuracy", "0.9")
    r = CliRunner().invoke(app, ["promote", NAME, "--metric", "accuracy", "--tracking-uri", mlflow.get_tracking_uri()])
    assert r.exit_code != 0 and "the champion v1 has no finite 'accuracy': cannot compare" in r.output


def test_a_rerun_leaves_the_champions_record_alone(registry):
    """Issue 16: every rerun of the gate retagged the champion 'rejected (already the champion)'."""
    v1 = _register(0.70)
    promote(NAME, "macro_f1")
    before = registry.get_model_version(NAME, v1).tags
    d = promote(NAME, "macro_f1")
    assert not d.promoted and d.outcome == "already the champion" and d.reasons == [f"v{v1} already is the champion"]
    after = registry.get_model_version(NAME, v1).tags
    assert after["sarflow.promotion.decision"] == "promoted" and after == before


def test_an_unreachable_tracking_server_fails_fast_naming_it():
    """Issue 16: a closed port hung ~259 s in MLflow's retries, then said 'not a registered model'."""
    import socket

    from typer.testing import CliRunner

    from sarflow.cli.main import app

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    r = CliRunner().invoke(app, ["promote", NAME, "--metric", "macro_f1", "--tracking-uri", uri])
    assert r.exit_code != 0 and f"{uri}: cannot reach the tracking server" in r.output, r.output
    assert "not a registered model" not in r.output


def test_a_model_with_a_non_finite_primary_metric_is_never_logged_or_registered(tmp_path):
    """The last guard before the registry: whatever a stage computed, NaN is not a score."""
    import mlflow
    from sklearn.linear_model import LogisticRegression

    from sarflow.downstream.models import log_downstream_model
    from sarflow.errors import InputError

    from sarflow.mlops.tracking import setup_mlflow

    exp = setup_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "guard")
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    with mlflow.start_run(experiment_id=exp) as run:
        with pytest.raises(InputError, match="primary metric test_macro_f1 is nan"):
            log_downstream_model(model, "flood", x[:2], lineage={}, eval_set="d:test:flood",
                                 metrics={"test_macro_f1": float("nan"), "test_accuracy": 0.5})
    assert mlflow.MlflowClient().search_registered_models() == []
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {}


def test_two_pipelines_gating_their_own_versions_leave_the_best_champion(registry):
    """Issue 16: two gates interleaved left the 0.82 model champion and lost the 0.85 one. Each
    pipeline judges the version it registered, so either order ends with the best as champion."""
    import json

    for order in ((3, 2), (2, 3)):
        if registry.search_registered_models(f"name='{NAME}'"):
            registry.delete_registered_model(NAME)
        v1 = _register(0.80)
        promote(NAME, "macro_f1", version=v1)
        v2, v3 = _register(0.85), _register(0.82)
        by_number = {2: v2, 3: v3}
        decisions = [promote(NAME, "macro_f1", version=by_number[k]) for k in order]
        assert _champion(registry) == v2, (order, [d.__dict__ for d in decisions])
        assert [d.champion_after for d in decisions][-1] == v2  # what each gate saw under its lock
        history = json.loads(registry.get_registered_model(NAME).tags["sarflow.promotion.history"])
        assert [h["version"] for h in history] == [v1, *(by_number[k] for k in order)]
        assert history[0]["outcome"] == "promoted" and history[0]["champion_before"] is None


def test_an_unknown_version_is_refused(registry):
    _register(0.7)
    with pytest.raises(InputError, match="has no version 9 \\(versions: 1\\)"):
        promote(NAME, "macro_f1", version="9")


def _postgres_or_skip() -> str:
    psycopg2 = pytest.importorskip("psycopg2")
    uri = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        psycopg2.connect(uri, connect_timeout=2).close()
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {e}")
    return uri


def _gate_in_another_process(tracking_uri: str, lock_uri: str, tmp: "Path", version: str):
    """`sarflow promote` as a second pod runs it: its own process and temp folder, the lock in PostgreSQL."""
    import os
    import subprocess
    import sys

    (tmp / "pod-tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp / "pod-tmp"), "SARFLOW_PROMOTION_LOCK": lock_uri}
    return subprocess.Popen([sys.executable, "-m", "sarflow.cli.main", "promote", NAME, "--metric", "macro_f1",
                             "--version", version, "--tracking-uri", tracking_uri],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_postgres_lock_serialises_gates_across_processes_and_dies_with_its_holder(registry, tmp_path):
    """Issue 16: the lock lived in each pod's temp folder. With the lock in PostgreSQL, a gate in
    another process (another temp folder) waits while the lock is held, then runs; a holder
    killed with SIGKILL leaves no lock behind."""
    import mlflow
    import signal
    import subprocess
    import sys
    import time

    from sarflow.mlops.locks import promotion_lock

    lock_uri = _postgres_or_skip()
    v1 = _register(0.7)
    with promotion_lock(NAME, mlflow.get_tracking_uri(), lock_uri=lock_uri):
        gate = _gate_in_another_process(mlflow.get_tracking_uri(), lock_uri, tmp_path, v1)
        time.sleep(4)
        assert gate.poll() is None, gate.communicate()[0]  # waiting on the lock
        assert not registry.get_registered_model(NAME).aliases
    out, _ = gate.communicate(timeout=120)
    assert gate.returncode == 0, out
    assert _champion(registry) == v1

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom sarflow.mlops.locks import promotion_lock\n"
        f"with promotion_lock({NAME!r}, 'sqlite:///x.db', lock_uri={lock_uri!r}):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with promotion_lock(NAME, mlflow.get_tracking_uri(), lock_uri=lock_uri, timeout_s=30):
        pass
    assert time.monotonic() - t0 < 30


def test_a_held_lock_times_out_with_a_message_and_an_unreachable_lock_database_is_named(registry):
    import mlflow

    from sarflow.mlops.locks import promotion_lock

    lock_uri = _postgres_or_skip()
    with promotion_lock(NAME, "sqlite:///x.db", lock_uri=lock_uri):
        with pytest.raises(InputError, match="another promotion of 'sarflow-landcover' held the lock"):
            with promotion_lock(NAME, "sqlite:///x.db", lock_uri=lock_uri, timeout_s=0.5):
                pass
    with pytest.raises(InputError, match="cannot reach the promotion lock's database") as e:
        with promotion_lock(NAME, "sqlite:///x.db", lock_uri="postgresql://gate:s3cret@127.0.0.1:1/nowhere"):
            pass
    assert "s3cret" not in str(e.value)
    with pytest.warns(UserWarning, match="does not serialise gates on other machines"):
        with promotion_lock(NAME, "http://127.0.0.1:5000"):
            pass

"""The features root's Feast repo is a Feast project a Feast user can work in: `sarflow features
apply` writes `features.py` (the applied objects as plain Feast code) beside feature_store.yaml and
the registry, so the `feast` CLI's `plan` shows no changes and its `apply` keeps every view and the
online rows; `feast ui` serves the registry; and Feast's failures a user can fix (Redis unreachable,
a truncated registry) are one-line errors through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sarflow.errors import InputError
from sarflow.features.definitions import REPO_FILE, _spec, check_repo_file
from sarflow.features.feast_store import FeatureConfig, apply, materialize, online_features, open_feature_store
from servers import free_port, stop, wait_http

FEAST = str(Path(sys.executable).with_name("feast"))
VIEWS = ["chip_bags", "chip_embeddings_mae_v1", "chip_embeddings_mae_v2", "chip_labels"]
SERVICES = ["downstream_training", "llp_training", "similarity"]


def make_root(root: Path, n: int = 6, dim: int = 4) -> list[str]:
    """A small features root written directly: two embeddings versions, labels and chip_bags."""
    ids = [f"c{i:03d}" for i in range(n)]
    ts = pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
    rng = np.random.default_rng(0)
    for version in ("1", "2"):
        d = root / "embeddings" / "model=sarflow-encoder-mae" / f"version={version}"
        d.mkdir(parents=True)
        emb = pa.array(rng.standard_normal((n, dim)).astype("float32").tolist(), pa.list_(pa.float32()))
        pq.write_table(pa.table({"chip_id": ids, "event_timestamp": ts, "embedding": emb, "model_version": [version] * n}),
                       d / "part-00000.parquet")
    (root / "labels").mkdir()
    pq.write_table(pa.table({"chip_id": ids, "split": ["train"] * n, "event_timestamp": ts,
                             "water": np.linspace(0, 1, n), "built": rng.random(n)}), root / "labels" / "part-00000.parquet")
    (root / "bags").mkdir()
    pq.write_table(pa.table({"chip_id": ids, "bag_ids": pa.array([["b0", "b1"]] * n, pa.list_(pa.string())),
                             "bag_weights": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float64())),
                             "area_fractions": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float64())), "event_timestamp": ts}),
                   root / "bags" / "chip_bags.parquet")
    return ids


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    root = tmp_path_factory.mktemp("project") / "features"
    ids = make_root(root)
    cfg = FeatureConfig(root=str(root))
    materialize_report = (apply(cfg), materialize(cfg))
    return {"root": root, "cfg": cfg, "ids": ids, "report": materialize_report}


def _registered(cfg: FeatureConfig, as_defined: bool = False) -> dict:
    """Every registered entity, view and service of the project, as its spec without times;
    `as_defined`: without the entity columns Feast infers for a view when it applies it."""
    fs = open_feature_store(cfg)
    fs.refresh_registry()
    objects = [*fs.list_entities(), *fs.list_feature_views(), *fs.list_feature_services()]
    for view in objects:
        if as_defined and hasattr(view, "entity_columns"):
            view.entity_columns = []
    return {(type(o).__name__, o.name): _spec(o) for o in objects}


def _feast(repo: Path, *args: str) -> str:
    res = subprocess.run([FEAST, "-c", str(repo), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_the_repo_file_defines_exactly_what_the_registry_holds(applied):
    cfg = applied["cfg"]
    path = cfg.repo / REPO_FILE
    assert path.is_file() and not list(cfg.repo.glob(f".{REPO_FILE}.*"))  # no temp file left
    text = path.read_text()
    assert "FeatureView(" in text and "FileSource(" in text and "sarflow.features" in text.split("from feast")[0]
    import runpy

    from feast import Entity, FeatureService, FeatureView

    defined = {(type(o).__name__, o.name): o for o in runpy.run_path(str(path)).values()
               if isinstance(o, (Entity, FeatureView, FeatureService))}
    registered = _registered(cfg, as_defined=True)
    assert sorted(k[1] for k in defined if k[0] == "FeatureView") == VIEWS
    assert sorted(k[1] for k in defined if k[0] == "FeatureService") == SERVICES
    assert set(defined) == set(registered)
    for key, obj in defined.items():
        assert _spec(obj) == registered[key], key
    assert defined["FeatureView", "chip_embeddings_mae_v2"].batch_source.path.endswith("version=2")


def test_a_repo_file_that_differs_from_the_applied_objects_is_refused(applied, tmp_path):
    from sarflow.features.definitions import build, repo_file

    objects = build(applied["root"])
    good = tmp_path / "good.py"
    good.write_text(repo_file(objects))
    check_repo_file(good, objects)
    bad = tmp_path / "bad.py"
    bad.write_text(repo_file(objects).replace("'dim': '4'", "'dim': '5'", 1))
    with pytest.raises(InputError, match=r"bad\.py: its \['chip_embeddings_mae_v1'\] differ"):
        check_repo_file(bad, objects)


@pytest.mark.slow
def test_feast_plan_and_apply_in_the_repo_change_nothing(applied):
    cfg, repo = applied["cfg"], applied["cfg"].repo
    plan = _feast(repo, "plan")
    assert "No changes to registry" in plan and "No changes to infrastructure" in plan, plan
    before, listed = _registered(cfg), _feast(repo, "feature-views", "list")
    out = _feast(repo, "apply")
    assert "Deleted" not in out and "No changes to registry" in out, out
    assert _feast(repo, "feature-views", "list") == listed and all(v in listed for v in VIEWS)
    assert _registered(cfg) == before
    df = online_features(cfg, applied["ids"][:3], ["chip_labels:water"])  # the online rows are still there
    np.testing.assert_allclose(df.water.to_numpy(), np.linspace(0, 1, 6)[:3])


@pytest.mark.slow
@pytest.mark.integration
def test_feast_ui_serves_the_features_root(applied):
    port = free_port()
    log = applied["root"].parent / f"feast-ui-{port}.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen([FEAST, "-c", str(applied["cfg"].repo), "ui", "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=fh, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/", server, log, seconds=120)

        def get(path: str):
            with urllib.request.urlopen(base + path, timeout=30) as r:
                assert r.status == 200, path
                return r.read()

        assert b"<html" in get("/").lower()
        projects = json.loads(get("/projects-list.json"))["projects"]
        assert [p["id"] for p in projects] == ["sarflow"]
        views = json.loads(get(f"{projects[0]['registryPath']}/feature_views?project=sarflow"))["featureViews"]
        assert sorted(v["spec"]["name"] for v in views) == VIEWS
    finally:
        stop(server)
    assert "No module named" not in log.read_text()


def _sarflow(*args):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_refusal(res, *needles) -> str:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_an_unreachable_redis_is_one_line_naming_host_and_port(tmp_path):
    root = tmp_path / "features"
    ids = make_root(root)
    where = f"127.0.0.1:{free_port()}"  # nothing listens there
    res = _sarflow("features", "materialize", "--root", root, "--online", "redis", "--redis", where)
    _one_line_refusal(res, where, "Redis online store is unreachable", "--redis")
    res = _sarflow("features", "get", ids[0], "--root", root, "--online", "redis", "--redis", where)
    _one_line_refusal(res, where, "unreachable")


def test_a_truncated_registry_is_one_line_naming_the_file_and_the_fix(tmp_path):
    root = tmp_path / "features"
    ids = make_root(root)
    assert _sarflow("features", "materialize", "--root", root).exit_code == 0
    registry = root / "feast" / "registry.db"
    registry.write_bytes(registry.read_bytes()[: registry.stat().st_size // 2])
    line = _one_line_refusal(_sarflow("features", "get", ids[0], "--root", root), str(registry), "truncated or corrupt")
    assert "sarflow features materialize" in line and "delete it" in line
    _one_line_refusal(_sarflow("features", "materialize", "--root", root), str(registry))
    registry.unlink()  # the fix the message names
    assert _sarflow("features", "materialize", "--root", root).exit_code == 0
    res = _sarflow("features", "get", ids[1], "--root", root, "--feature", "chip_labels:water")
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])[0]["water"] == pytest.approx(0.2)


def test_a_redis_with_a_password_is_reached_with_REDIS_PASSWORD_and_refused_without(tmp_path, monkeypatch):
    """A real redis-server with requirepass (as k8s/base/redis.yaml runs it): with REDIS_PASSWORD set
    the features materialize and read back, feature_store.yaml holding `${REDIS_PASSWORD}`, never
    the password; without it, or with a wrong one, one line saying the login was refused."""
    import shutil
    import subprocess
    import time

    redis_server = shutil.which("redis-server")
    if not redis_server:
        pytest.skip("redis-server not on PATH")
    redis = pytest.importorskip("redis")
    port = free_port()
    proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password="s3cret")
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        root = tmp_path / "features"
        ids = make_root(root)
        where = f"127.0.0.1:{port}"
        monkeypatch.delenv("REDIS_PASSWORD", raising=False)
        _one_line_refusal(_sarflow("features", "materialize", "--root", root, "--online", "redis", "--redis", where),
                          where, "refused the login with no password", "REDIS_PASSWORD")
        monkeypatch.setenv("REDIS_PASSWORD", "wrong")
        _one_line_refusal(_sarflow("features", "materialize", "--root", root, "--online", "redis", "--redis", where),
                          where, "refused the login with the password in $REDIS_PASSWORD")
        monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
        res = _sarflow("features", "materialize", "--root", root, "--online", "redis", "--redis", where)
        assert res.exit_code == 0, res.output
        text = (root / "feast" / "feature_store.yaml").read_text()
        assert "${REDIS_PASSWORD}" in text and "s3cret" not in text
        res = _sarflow("features", "get", ids[1], "--root", root, "--online", "redis", "--redis", where,
                       "--feature", "chip_labels:water")
        assert res.exit_code == 0, res.output
        assert json.loads(res.output.strip().splitlines()[-1])[0]["water"] == pytest.approx(0.2)
        assert client.dbsize() > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)

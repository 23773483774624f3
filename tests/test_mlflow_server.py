"""Pretraining against a real `mlflow server` on 127.0.0.1, as on the cluster: PostgreSQL
(127.0.0.1:5432) as the backend store and artifacts on the S3 test server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import zarr

from sarflow.data.storage import ensure_bucket
from sarflow.training.methods import OptimConfig
from sarflow.training.pretrain import PretrainConfig, pretrain
from sarflow.training.vit import ViTConfig
from servers import free_port, stop, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def postgres_db():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=2)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (MLflow's backend store on the cluster): {e}")
    admin.autocommit = True
    name = f"sarflow_mlflow_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"  # SQLAlchemy 2.1 defaults to psycopg 3
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_pretrain_with_mlflow_server_on_postgres_and_s3_artifacts(postgres_db, moto_url, tiny_store, tmp_path, monkeypatch):
    import mlflow

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": moto_url, "MLFLOW_S3_ENDPOINT_URL": moto_url,
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ensure_bucket("sarflow-mlflow")
    port = free_port()
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", postgres_db, "--artifacts-destination", "s3://sarflow-mlflow/artifacts",
             "--serve-artifacts"], env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, log, seconds=120)
        uri = f"http://127.0.0.1:{port}"
        r = pretrain(PretrainConfig(store=str(tiny_store), method="mae",
                                    vit=ViTConfig(size="tiny", patch=8, depth=1, dim=32, heads=2), batch_size=8,
                                    optim=OptimConfig(max_steps=2, warmup_steps=1), tracking_uri=uri,
                                    method_kwargs={"decoder_dim": 32, "decoder_depth": 1}))
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        assert client.get_run(r["run_id"]).data.tags["sarflow.catalog_hash"]
        assert client.get_model_version("sarflow-encoder-mae", r["version"]).status == "READY"
        model = mlflow.pytorch.load_model(f"models:/sarflow-encoder-mae/{r['version']}")
        from sarflow.features.embed import encoder_arrays, encoder_chips

        g = zarr.open_group(str(tiny_store), mode="r")
        x = torch.from_numpy(encoder_chips(encoder_arrays(g, model, str(tiny_store)), slice(0, 2)))  # its own inputs
        assert torch.isfinite(model(x)).all()
        # the artifacts really are in the S3 server's bucket, the runs in PostgreSQL
        from sarflow.data.storage import minio_client

        keys = [o.object_name for o in minio_client().list_objects("sarflow-mlflow", prefix="artifacts/", recursive=True)]
        assert any(k.endswith("MLmodel") for k in keys)
    finally:
        stop(server)


def test_the_clusters_basic_auth_mlflow_refuses_anonymous_clients(postgres_db, tmp_path, monkeypatch):
    """k8s/base/mlflow.yaml's `mlflow server --app-name=basic-auth` with its settings file (user
    store in PostgreSQL, NO_PERMISSIONS by default) and the admin from the environment, as the
    Secret gives it: anonymous and wrong-password requests get 401, a client with
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the pipeline's Secret) works."""
    import configparser
    from pathlib import Path

    import mlflow
    import requests

    pytest.importorskip("flask_wtf", reason="mlflow[auth] (the services extra) not installed")
    ini = configparser.ConfigParser()
    ini.read(Path(__file__).resolve().parents[1] / "k8s" / "base" / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    ini["mlflow"]["database_uri"] = postgres_db  # the manifest's postgres, here the test database
    settings = tmp_path / "basic_auth.ini"
    with open(settings, "w") as fh:
        ini.write(fh)
    import yaml

    manifest = next(d for d in yaml.safe_load_all((Path(__file__).resolve().parents[1] / "k8s" / "base" / "mlflow.yaml")
                                                   .read_text()) if d and d.get("kind") == "Deployment")
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
                   if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "sarflow-mlflow"}
    secret = {"MLFLOW_TRACKING_USERNAME": "sarflow-admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-from-secret",
              "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-from-secret"}  # Secret sarflow-mlflow's keys
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(settings), **{k: secret[v] for k, v in from_secret.items()}}
    port = free_port()
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", postgres_db, "--app-name=basic-auth"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, log, seconds=180)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
        assert requests.post(api, json={"max_results": 10}, timeout=30).status_code == 401
        assert requests.post(api, json={"max_results": 10}, auth=("sarflow-admin", "wrong"), timeout=30).status_code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sarflow-admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-from-secret")
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        exp = client.create_experiment("behind-auth")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    finally:
        stop(server)

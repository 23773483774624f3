"""`sarflow services up|down`: the cluster's services as real servers on 127.0.0.1.

The local "cluster-like" mode: instead of the embedded default (files and SQLite), pipelines
talk to servers, as they do on Kubernetes:

- **S3** (standing in for MinIO): moto in server mode, with the buckets k8s/ creates
  (``sarflow-dvc``, ``sarflow-mlflow``, ``sarflow-features``, ``sarflow-chips``);
- **MLflow**: ``mlflow server`` with its backend store on PostgreSQL (127.0.0.1:5432, a
  database of its own per ``up``, dropped by ``down``: the S3 stand-in keeps its objects in
  memory, so runs must not outlive it) or SQLite where no PostgreSQL answers, and its
  artifacts in the S3 server (``--serve-artifacts``: clients upload through the server);
- **Feast feature server**: ``feast serve`` over a local feature repository whose online store
  is Redis (127.0.0.1:6379) and whose offline store is ``s3://sarflow-features`` on the S3
  server; it re-reads the registry every few seconds, so views applied later are served. It
  runs with :func:`feast_serve_flags`, the flags k8s/base/feast.yaml passes too: worker
  recycling off (Feast's default restarts its worker every ~1,000 requests, which a load test
  saw as failed requests and seconds-long p99 spikes) and the worker count from
  :func:`feast_workers`.

The servers run detached (their own session; they outlive the command) and write logs in the
state folder; ``services.json`` there records their ports, pids and the environment a client
needs (:func:`client_env`), which ``sarflow services env`` prints as ``export`` lines.
``down`` stops them (process group, TERM then KILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from sarflow.errors import SarflowError
from sarflow.processes import alive
from sarflow.params import environ

STATE = "services.json"
BUCKETS = ("sarflow-dvc", "sarflow-mlflow", "sarflow-features", "sarflow-chips")
S3_KEYS = {"AWS_ACCESS_KEY_ID": "sarflow-local", "AWS_SECRET_ACCESS_KEY": "sarflow-local-secret",
           "AWS_DEFAULT_REGION": "us-east-1",
           # moto answers without the newer default checksums the AWS SDKs send
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"  # SQLAlchemy 2.1 defaults to psycopg 3
MLFLOW_DB = "sarflow_mlflow"


class ServiceError(SarflowError):
    """A local service could not be started, reached or stopped."""


FEAST_WORKERS_ENV = "SARFLOW_FEAST_WORKERS"
FEAST_MAX_WORKERS = 4  # each worker holds its own FeatureStore and registry copy (~150 MB)


def feast_workers(workers: int | None = None) -> int:
    """The feature server's worker processes: `workers`, else $SARFLOW_FEAST_WORKERS, else one
    per two cores this process may use (at least 1, at most FEAST_MAX_WORKERS): locally its
    clients (pipelines, notebooks) share those cores, and on 2 busy cores one worker answered
    70 requests/s where two answered 48 (benchmarks/bench_feature_server.py). k8s sets
    FEAST_WORKERS per pod (base: 1 for a 2-CPU limit; the gpu overlay: 2 for 4)."""
    if workers is None and os.environ.get(FEAST_WORKERS_ENV):
        raw = os.environ[FEAST_WORKERS_ENV]
        try:
            workers = int(raw)
        except ValueError:
            raise ServiceError(f"${FEAST_WORKERS_ENV}={raw!r}: not a whole number of workers") from None
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(FEAST_MAX_WORKERS, max(1, cores // 2))
    if workers < 1:
        raise ServiceError(f"feature server workers: {workers}; at least 1 is needed")
    return workers


def feast_serve_flags(workers: int | str) -> list[str]:
    """The `feast serve` flags sarflow runs the feature server with, locally and on k8s
    (k8s/base/feast.yaml passes the same, with `workers` = $(FEAST_WORKERS)):

    - ``--max-requests=0``: no worker recycling. Feast's default (1,000 requests + up to 50
      jitter) restarts the worker every ~1,000 requests; with one worker nothing answers while
      it restarts, and requests on its closing keep-alive connections fail (a 60 s load test
      at 20 clients: 0.23 % errors, p99 2.6 s; with recycling off: no errors, p99 67 ms).
      Memory growth is bounded by the pod's memory limit instead (k8s restarts the pod).
    - ``--workers``: processes answering in parallel (:func:`feast_workers`).
    - ``--no-access-log``: no log line per request (a busy server's log grows without bound).
    - ``--registry_ttl_sec=5``: views applied after start are served within seconds.

    benchmarks/bench_feature_server.py measures these against Feast's defaults."""
    return [f"--workers={workers}", "--max-requests=0", "--max-requests-jitter=0", "--no-access-log",
            "--registry_ttl_sec=5"]


def feast_serve_command(repo: str | Path, host: str, port: int, workers: int | None = None) -> list[str]:
    """`feast -c REPO serve` on host:port with :func:`feast_serve_flags` (this interpreter's Feast)."""
    return [sys.executable, "-m", "feast.cli.cli", "-c", str(repo), "serve", f"--host={host}", f"--port={port}",
            *feast_serve_flags(feast_workers(workers))]


def free_port() -> int:
    """A port nothing listens on (the kernel's pick, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90, poll: float = 0.3) -> None:
    """Waits until `url` answers; a server that exits or stays silent is stopped and reported
    with the end of its log."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"server exited ({proc.returncode}); end of {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise ServiceError(f"{url} did not answer within {seconds} s; end of {log}:\n{log.read_text()[-3000:]}")
            time.sleep(poll)


def start_server(cmd: list[str], log: Path, health: str, env: dict[str, str] | None = None,
                 seconds: float = 90, detach: bool = False) -> subprocess.Popen:
    """Starts `cmd` with its output in `log` (a file, never a pipe that could fill) and waits
    until `health` answers. `detach`: in its own session, so it outlives this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=detach)
    wait_http(health, proc, log, seconds=seconds)
    return proc


def start_s3(log: Path, detach: bool = False, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on a free port of 127.0.0.1; returns (process, URL)."""
    for attempt in range(3):  # the free port may be taken between picking it and binding it
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            # the moto API does not count as an AWS action (it leaves INITIAL_NO_AUTH_ACTION_COUNT alone)
            proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log,
                                url + "/moto-api/data.json", env=env, seconds=30, detach=detach)
            return proc, url
        except ServiceError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _postgres_admin():
    try:
        import psycopg2
    except ImportError:
        return None
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=2)
    except psycopg2.OperationalError:
        return None
    conn.autocommit = True
    return conn


def drop_postgres_database(db: str) -> None:
    conn = _postgres_admin()
    if conn is not None:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


def postgres_backend(db: str = MLFLOW_DB) -> str | None:
    """A PostgreSQL database for MLflow on 127.0.0.1:5432 (created when missing), or None when
    no PostgreSQL answers there."""
    conn = _postgres_admin()
    if conn is None:
        return None
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    return POSTGRES.format(db=db)


def s3_env(url: str) -> dict[str, str]:
    """The environment that points boto3, MLflow and Feast at the S3 server at `url`."""
    return {**S3_KEYS, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, "FEAST_S3_ENDPOINT_URL": url}


def client_env(state: dict) -> dict[str, str]:
    """The environment a client (CLI, pipeline task) needs to use the services."""
    env = {**s3_env(state["s3"]["url"]), "MLFLOW_TRACKING_URI": state["mlflow"]["url"]}
    if "feast" in state:
        env["SARFLOW_FEAST_REPO"] = state["feast"]["repo"]
        env["SARFLOW_FEAST_SERVER_URL"] = state["feast"]["url"]
    return env


def pipeline_arguments(state: dict) -> dict[str, str]:
    """Pipeline arguments that point a pipeline at the services (tracking server, the S3 DVC
    remote and features root, Redis online store)."""
    args = {"tracking_uri": state["mlflow"]["url"], "dvc_remote": "s3://sarflow-dvc/pipelines"}
    if "feast" in state:
        args.update(features_root=state["feast"]["features_root"], online="redis",
                    redis=state["feast"]["redis"])
    return args


def read_state(state_dir: str | Path) -> dict:
    path = Path(state_dir) / STATE
    if not path.is_file():
        raise ServiceError(f"{path}: no services recorded here (run `sarflow services up {state_dir}` first)")
    return json.loads(path.read_text())




def services_up(state_dir: str | Path, *, redis: str = "127.0.0.1:6379", backend: str | None = None,
                features_root: str = "s3://sarflow-features", feast: bool = True,
                workers: int | None = None) -> dict:
    """Starts S3, MLflow and (with `feast`) the Feast feature server; returns the state.
    `workers`: the feature server's worker processes (default :func:`feast_workers`)."""
    from sarflow.features.feast_store import FeatureConfig, open_feature_store
    from sarflow.data.storage import ensure_bucket

    workers = feast_workers(workers) if feast else None  # a bad count fails before anything starts
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STATE).is_file():
        old = read_state(state_dir)
        running = [name for name, s in old.items() if isinstance(s, dict) and "pid" in s and alive(s["pid"])]
        if running:
            raise ServiceError(f"{state_dir / STATE}: services already running ({', '.join(running)}); "
                               f"run `sarflow services down {state_dir}` first")
    started: list[subprocess.Popen] = []
    try:
        s3, s3_url = start_s3(state_dir / "s3.log", detach=True)
        started.append(s3)
        state: dict = {"dir": str(state_dir), "s3": {"url": s3_url, "pid": s3.pid, "log": str(state_dir / "s3.log")}}
        env = s3_env(s3_url)
        with environ(env):
            for bucket in BUCKETS:
                ensure_bucket(bucket)
        # the S3 stand-in keeps its objects in memory, so the runs that point at them must not
        # outlive it either: a database of its own per `up`, dropped by `down`
        database = None
        if backend is None:
            database = f"{MLFLOW_DB}_{uuid.uuid4().hex[:8]}"
            backend = postgres_backend(database)
            if backend is None:
                database = None
                backend = f"sqlite:///{state_dir / 'mlflow.db'}"
        port = free_port()
        log = state_dir / "mlflow.log"
        mlflow = start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", backend,
                               "--artifacts-destination", "s3://sarflow-mlflow/artifacts", "--serve-artifacts"],
                              log, f"http://127.0.0.1:{port}/health", env=env, seconds=180, detach=True)
        started.append(mlflow)
        state["mlflow"] = {"url": f"http://127.0.0.1:{port}", "pid": mlflow.pid, "log": str(log),
                           "backend": backend.split("@")[-1] if backend.startswith("postgresql") else backend,
                           "artifacts": "s3://sarflow-mlflow/artifacts", "database": database}
        if feast:
            cfg = FeatureConfig(root=features_root, online="redis", redis=redis, repo=str(state_dir / "feast"))
            with environ(env):
                open_feature_store(cfg)  # writes feature_store.yaml (and an empty registry)
            port = free_port()
            log = state_dir / "feast.log"
            server = start_server(feast_serve_command(cfg.repo, "127.0.0.1", port, workers),
                                  log, f"http://127.0.0.1:{port}/health", env=env, seconds=120, detach=True)
            started.append(server)
            state["feast"] = {"url": f"http://127.0.0.1:{port}", "pid": server.pid, "log": str(log),
                              "repo": str(cfg.repo), "features_root": features_root, "redis": redis,
                              "workers": workers}
    except BaseException:
        for proc in started:
            _stop_group(proc.pid)
        raise
    state["env"] = client_env(state)
    tmp = state_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, state_dir / STATE)
    return state


def _stop_group(pid: int, seconds: float = 10) -> bool:
    """TERM, then KILL, the process group `pid` leads; True if it was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def services_down(state_dir: str | Path) -> dict[str, bool]:
    """Stops every recorded service; returns which were running."""
    state = read_state(state_dir)
    stopped = {}
    for name in ("feast", "mlflow", "s3"):
        if name in state:
            stopped[name] = _stop_group(int(state[name]["pid"]))
    if state.get("mlflow", {}).get("database"):
        drop_postgres_database(state["mlflow"]["database"])
    (Path(state_dir) / STATE).unlink()
    return stopped

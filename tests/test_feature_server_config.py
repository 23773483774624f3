"""The feature server k8s deploys runs with the flags the local one does (`sarflow services up`):
k8s/base/feast.yaml's args and sarflow.local.services.feast_serve_command, read both and parsed by
Feast's own CLI; and the worker count's sources (argument, $SARFLOW_FEAST_WORKERS, cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sarflow.local.services import (FEAST_MAX_WORKERS, FEAST_WORKERS_ENV, ServiceError, feast_serve_command,
                                    feast_serve_flags, feast_workers)

ROOT = Path(__file__).resolve().parents[1]


def _deployment_container() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "feast.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "feast")
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "feast")


def _serve_params(argv: list[str]) -> dict:
    """Feast's CLI parses `argv` (everything after the `feast` executable) into serve's options."""
    from feast.cli.cli import cli

    at = argv.index("serve")
    ctx = cli.make_context("feast", list(argv[:at + 1]))
    return cli.get_command(ctx, "serve").make_context("serve", list(argv[at + 1:]), parent=ctx).params


def test_deployment_args_equal_the_local_commands_flags():
    c = _deployment_container()
    local = feast_serve_command("/repo", "127.0.0.1", 6566, workers=3)
    local_flags = local[local.index("serve") + 1:]
    # the same flags in the same order, host and port aside; workers from $(FEAST_WORKERS)
    k8s_flags = [a for a in c["args"] if not a.startswith(("--host=", "--port="))]
    assert k8s_flags == feast_serve_flags("$(FEAST_WORKERS)")
    assert [a for a in local_flags if not a.startswith(("--host=", "--port="))] == feast_serve_flags(3)
    assert "--max-requests=0" in k8s_flags


@pytest.mark.slow
def test_feast_parses_both_to_the_same_options():
    c = _deployment_container()
    # parsed by Feast: every option equal but host (0.0.0.0 in the pod) once workers are expanded
    workers = next(e["value"] for e in c["env"] if e["name"] == "FEAST_WORKERS")
    pod = _serve_params([*c["command"][1:], *(a.replace("$(FEAST_WORKERS)", workers) for a in c["args"])])
    here = _serve_params(feast_serve_command("/repo", "0.0.0.0", 6566, workers=int(workers))[3:])
    assert pod == here
    assert pod["max_requests"] == 0 and pod["no_access_log"] is True and pod["registry_ttl_sec"] == 5
    # recycling off is what Feast's defaults are not
    assert _serve_params(["serve"])["max_requests"] > 0


def test_feast_workers_sources(monkeypatch):
    monkeypatch.delenv(FEAST_WORKERS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert feast_workers() == min(FEAST_MAX_WORKERS, max(1, cores // 2))
    assert feast_workers(3) == 3
    monkeypatch.setenv(FEAST_WORKERS_ENV, "5")
    assert feast_workers() == 5 and feast_workers(2) == 2
    monkeypatch.setenv(FEAST_WORKERS_ENV, "many")
    with pytest.raises(ServiceError, match=FEAST_WORKERS_ENV):
        feast_workers()
    with pytest.raises(ServiceError, match="at least 1"):
        feast_workers(0)


@pytest.mark.slow
def test_sarflow_features_serve_runs_feast_with_the_same_flags_and_answers(tmp_path):
    """`sarflow features serve` execs the feature server with feast_serve_flags (what `services
    up` and k8s run): its process's command line carries them, and it serves a chip's features."""
    import json
    import subprocess
    import sys
    import urllib.request

    from sarflow.features.feast_store import FeatureConfig, apply, materialize
    from sarflow.local.services import free_port, stop, wait_http
    from test_feast_project import make_root

    root = tmp_path / "features"
    ids = make_root(root)
    cfg = FeatureConfig(root=str(root))
    apply(cfg), materialize(cfg)
    port, log = free_port(), tmp_path / "serve.log"
    sarflow = Path(sys.executable).with_name("sarflow")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(sarflow), "features", "serve", "--features-root", str(root), "--port", str(port),
                                 "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, seconds=180)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
        assert argv[argv.index("serve") + 1:][-len(feast_serve_flags(1)):] == feast_serve_flags(1)
        body = json.dumps({"features": ["chip_labels:water"], "entities": {"chip_id": [ids[1]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            got = json.loads(r.read())
        names = got["metadata"]["feature_names"]
        water = got["results"][names.index("water")]["values"][0]
        assert water == pytest.approx(0.2)
    finally:
        stop(proc)

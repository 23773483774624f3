"""Kubernetes jobs a pipeline task launches and waits for: the tiler's Indexed Job
(`data.tile_units.run_indexed_job`) and the pretraining TrainJob
(`training.distributed.run_train_job`).

Both are named after what they build (one store, one training run), so a rerun finds the job
an earlier run left behind (jobs are kept a while after they end). :func:`launch_and_wait`
gives both the same rule: a job of that name still running is the same work, adopted and waited
for (never a second writer of the same outputs); a finished or failed one is deleted, waited
gone and created anew. The API calls are passed in, so the rule is one piece of code over the
batch API's Job and the custom-objects API's TrainJob.
"""

from __future__ import annotations

import time
from typing import Callable

RUNNING, COMPLETE, FAILED, ABSENT = "running", "complete", "failed", "absent"


def launch_and_wait(what: str, create: Callable[[], None], state: Callable[[], str], delete: Callable[[], None],
                    timeout_s: float, poll_s: float, failed_hint: str = "") -> None:
    """Creates the job (`create` raises kubernetes' ApiException 409 when its name is taken), or
    adopts / replaces the one of that name (module doc), then polls `state()` (RUNNING, COMPLETE,
    FAILED or ABSENT) until COMPLETE. FAILED is a RuntimeError and no end by `timeout_s` a
    TimeoutError, both naming `what`."""
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            create()
            break
        except ApiException as e:
            if e.status != 409:
                raise
        if state() == RUNNING:
            break  # the same work, still running: wait for it
        delete()
        while state() != ABSENT:  # gone before the new one is created
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: the previous run's job was not deleted in {timeout_s}s")
            time.sleep(poll_s)
    while time.monotonic() < deadline:
        now = state()
        if now == COMPLETE:
            return
        if now == FAILED:
            raise RuntimeError(f"{what} failed{failed_hint}")
        if now == ABSENT:  # deleted from outside (kubectl delete, a TTL controller) while we waited
            raise RuntimeError(f"{what} disappeared before it completed (deleted from outside?); rerun the task")
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not finish in {timeout_s}s")


def conditions_state(conditions, done: bool = False) -> str:
    """RUNNING, COMPLETE or FAILED from a job's status conditions (objects or dicts with `type`
    and `status`: batch Jobs and TrainJobs both report Complete / Failed); `done` when the caller
    knows from its counts that every completion succeeded."""
    def true(kind):
        return any((c.get("type"), c.get("status")) == (kind, "True") if isinstance(c, dict) else
                   (c.type, c.status) == (kind, "True") for c in conditions or [])

    if true("Failed"):
        return FAILED
    return COMPLETE if done or true("Complete") else RUNNING


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def kube_api(kind: str):
    """A kubernetes client API (`kind`: BatchV1Api, CustomObjectsApi, ...) configured in-cluster
    (a pipeline task's service account), else from ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return getattr(client, kind)()


def current_namespace(default: str = "sarflow") -> str:
    """The namespace of this pod's service account, else `default` (outside a cluster)."""
    from pathlib import Path

    path = Path(SERVICE_ACCOUNT_NAMESPACE)
    return path.read_text().strip() if path.is_file() else default

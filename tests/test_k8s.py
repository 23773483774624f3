"""Kubernetes manifests (k8s/) and Dockerfiles (docker/): render, validate, check the policies.

Everything here is offline: `kubectl kustomize` renders locally, kubernetes-validate ships the
JSON schemas, and the NetworkPolicy checks evaluate the rendered policies in Python.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"

TARGETS = ["base", "overlays/local", "overlays/gpu"]
NAMESPACE = "sarflow"
# Kubernetes versions the manifests are validated against: the oldest one we support (also used
# for the negative control) and the newest kubernetes-validate 1.37 ships schemas for (no network).
K8S_VERSION = "1.30"
K8S_VERSIONS = [K8S_VERSION, "1.37"]

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
BUCKETS = ["sarflow-chips", "sarflow-dvc", "sarflow-mlflow", "sarflow-feast"]
SECRETS = {"sarflow-minio", "sarflow-s3", "sarflow-postgres", "sarflow-mlflow", "sarflow-redis"}
IMAGES_COMPONENT = K8S / "components" / "images" / "kustomization.yaml"
TRAINER_TARGET = "trainer"  # the sarflow Kubeflow Trainer runtime (k8s/trainer/kustomization.yaml)
PIPELINE_ENV = ["AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "SARFLOW_FEAST_REPO"]


# ------------------------------------------------------------------------------------ rendering


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if not exe:
        pytest.skip("kubectl not on PATH (it renders the kustomizations: `kubectl kustomize`)")
    return exe


@functools.lru_cache(maxsize=None)
def _render_cached(exe: str, target: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        [exe, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(target: str) -> list[dict]:
    return list(_render_cached(_kubectl(), target))


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_templates(objs: list[dict]):
    """Yield (object, pod spec, pod labels, long_running) for every workload in `objs`."""
    for obj in objs:
        kind = obj["kind"]
        if kind in ("ClusterTrainingRuntime", "TrainingRuntime"):  # Kubeflow Trainer: a JobSet template
            for rjob in obj["spec"]["template"]["spec"]["replicatedJobs"]:
                tmpl = rjob["template"]["spec"]["template"]
                yield obj, tmpl["spec"], (tmpl.get("metadata") or {}).get("labels") or {}, False
            continue
        if kind not in WORKLOAD_KINDS:
            continue
        if kind == "Pod":
            tmpl = {"metadata": obj["metadata"], "spec": obj["spec"]}
        elif kind == "CronJob":
            tmpl = obj["spec"]["jobTemplate"]["spec"]["template"]
        else:
            tmpl = obj["spec"]["template"]
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        yield obj, tmpl["spec"], labels, kind in LONG_RUNNING_KINDS


def containers(spec: dict):
    """Yield (kind of container, container) for init and app containers."""
    for c in spec.get("initContainers") or []:
        yield "initContainer", c
    for c in spec.get("containers") or []:
        yield "container", c


def all_containers(objs: list[dict]):
    for obj, spec, _labels, long_running in pod_templates(objs):
        for ckind, c in containers(spec):
            yield obj, spec, ckind, c, long_running


@pytest.fixture(params=TARGETS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


# ----------------------------------------------------------------------- render + schema checks


def test_renders_every_target_with_the_expected_objects(rendered):
    target, objs = rendered
    names = {name_of(o) for o in objs}
    expected = {
        "Namespace/sarflow",
        "StatefulSet/minio", "Service/minio", "Job/minio-buckets",
        "StatefulSet/postgres", "Service/postgres",
        "Deployment/mlflow", "Service/mlflow",
        "Deployment/redis", "Service/redis",
        "Deployment/feast", "Service/feast",
        "ConfigMap/sarflow-feast-repo", "ConfigMap/sarflow-pipeline-env",
        "ServiceAccount/sarflow-pipeline-runner", "Role/sarflow-pipeline-runner",
        "RoleBinding/sarflow-pipeline-runner",
        "NetworkPolicy/default-deny-all",
    }
    assert expected <= names, f"k8s/{target} misses {sorted(expected - names)}"
    # every namespaced object lands in the sarflow namespace
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{name_of(o)} in k8s/{target}"
    # no duplicate objects
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys))


def test_kubernetes_validate_ships_the_schema_versions():
    from kubernetes_validate.utils import all_versions

    for version in K8S_VERSIONS:
        assert any(v.startswith(version + ".") for v in all_versions()), (version, all_versions())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, version):
    import kubernetes_validate

    target, objs = rendered
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name_of(obj)}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{name_of(obj)}: {e.message}")
    assert not errors, f"k8s/{target} against Kubernetes {version}:\n" + "\n".join(errors)


def test_schema_validation_rejects_a_broken_object():
    """Negative control: strict validation really runs (unknown field, wrong type)."""
    import copy

    import kubernetes_validate

    dep = copy.deepcopy(find(render("base"), "Deployment", "mlflow"))
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- pod policy checks

_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_problem(image: str) -> str | None:
    if _DIGEST.search(image):
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    tag = last.split(":", 1)[1]
    if tag in ("", "latest") or tag.endswith("-latest"):
        return f"uses the floating tag {tag!r}"
    return None


def test_image_check_itself():
    assert image_problem("redis") == "has no tag"
    assert image_problem("localhost:5000/redis") == "has no tag"
    assert image_problem("quay.io/minio/mc:latest")
    assert image_problem("redis:7.4.5-bookworm") is None
    assert image_problem("localhost:5000/redis:7.4.5") is None
    assert image_problem("redis@sha256:" + "a" * 64) is None


def test_images_are_pinned(rendered):
    target, objs = rendered
    bad = [
        f"{name_of(o)} {c['name']}: {c.get('image')!r} {image_problem(c.get('image') or '')}"
        for o, _s, _k, c, _lr in all_containers(objs)
        if image_problem(c.get("image") or "")
    ]
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)
    images = {c["image"] for _o, _s, _k, c, _lr in all_containers(objs)}
    assert "ghcr.io/sarflow/sarflow:0.1.0" in images
    assert any(i.startswith("quay.io/minio/mc:RELEASE.") for i in images)


def pinned_images() -> dict[str, dict]:
    """name -> entry of the one images list (k8s/components/images)."""
    entries = yaml.safe_load(IMAGES_COMPONENT.read_text())["images"]
    assert len({e["name"] for e in entries}) == len(entries), "an image is listed twice"
    return {e["name"]: e for e in entries}


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """'repo/name:tag@sha256:..' -> (repo/name, tag, digest)."""
    rest, _, digest = image.partition("@")
    head, slash, last = rest.rpartition("/")
    name, _, tag = last.partition(":")
    return head + slash + name, tag or None, digest or None


def test_image_split_itself():
    assert _split_image("localhost:5000/redis:7.4") == ("localhost:5000/redis", "7.4", None)
    assert _split_image("redis@sha256:" + "a" * 64) == ("redis", None, "sha256:" + "a" * 64)
    assert _split_image("quay.io/minio/mc") == ("quay.io/minio/mc", None, None)


@pytest.mark.parametrize("target", TARGETS + [TRAINER_TARGET])
def test_every_image_comes_from_the_one_images_list(target):
    """Issue 16: every rendered image is in k8s/components/images with exactly its tag (and
    digest); the list itself names no floating or missing tag; nothing in it is unused."""
    pins = pinned_images()
    for name, entry in pins.items():
        assert entry.get("newTag") or entry.get("digest"), f"{name}: no tag or digest in the images list"
        assert entry.get("newTag") not in ("latest", ""), f"{name}: floating tag"
        if entry.get("digest"):
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"]), entry
    bad = []
    for o, _s, _k, c, _lr in all_containers(render(target)):
        name, tag, digest = _split_image(c["image"])
        if name not in pins:
            bad.append(f"{name_of(o)} {c['name']}: {c['image']} is not in the images list")
            continue
        if image_problem(c["image"]):
            bad.append(f"{name_of(o)} {c['name']}: {c['image']} {image_problem(c['image'])}")
        if tag != pins[name].get("newTag") or digest != pins[name].get("digest"):
            bad.append(f"{name_of(o)} {c['name']}: {c['image']} differs from the list's {pins[name]}")
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)


def test_images_list_is_used_and_matches_the_pipeline_components():
    pins = pinned_images()
    used = {_split_image(c["image"])[0] for t in TARGETS + [TRAINER_TARGET]
            for _o, _s, _k, c, _lr in all_containers(render(t))}
    assert set(pins) == used, f"listed but never deployed: {sorted(set(pins) - used)}"
    # the pipeline components' base images (Kubeflow creates those pods) carry the same tags
    sources = [*(ROOT / "components").glob("*.py"), ROOT / "pipelines" / "platform.py",
               ROOT / "src" / "sarflow" / "training" / "distributed.py"]
    refs = {m for p in sources if p.is_file()
            for m in re.findall(r"ghcr\.io/sarflow/sarflow(?:-gpu)?:[\w.-]+", p.read_text())}
    assert refs, "no project image referenced by the components"
    for ref in refs:
        name, tag, _ = _split_image(ref)
        assert tag == pins[name]["newTag"], f"{ref}: the images list pins {name}:{pins[name]['newTag']}"


def test_requests_and_limits_on_every_container(rendered):
    target, objs = rendered
    bad = []
    for o, _s, ckind, c, _lr in all_containers(objs):
        res = c.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (res.get(section) or {}):
                    bad.append(f"{name_of(o)} {ckind} {c['name']}: no {section}.{resource}")
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)


def _qty(value) -> float:
    """Kubernetes quantity -> float (cores or bytes)."""
    s = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


def test_requests_do_not_exceed_limits(rendered):
    target, objs = rendered
    for o, _s, _k, c, _lr in all_containers(objs):
        res = c["resources"]
        for resource, req in res["requests"].items():
            lim = res["limits"].get(resource)
            if lim is not None:
                assert _qty(req) <= _qty(lim), f"{name_of(o)} {c['name']} {resource}: {req} > {lim}"


def test_security_context_on_every_container(rendered):
    target, objs = rendered
    bad = []
    for o, spec, ckind, c, _lr in all_containers(objs):
        psc = spec.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        where = f"{name_of(o)} {ckind} {c['name']}"
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"{where}: runAsNonRoot is not true")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if uid is None or uid == 0:
            bad.append(f"{where}: no non-root runAsUser ({uid})")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            bad.append(f"{where}: privileged")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if (csc.get("capabilities") or {}).get("add"):
            bad.append(f"{where}: adds capabilities")
        if csc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: root filesystem is writable")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            bad.append(f"{where}: seccompProfile is {seccomp}")
    for o, spec, _labels, _lr in pod_templates(objs):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                bad.append(f"{name_of(o)}: {flag}")
        for vol in spec.get("volumes") or []:
            if "hostPath" in vol:
                bad.append(f"{name_of(o)}: hostPath volume {vol['name']}")
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)


# The `restricted` Pod Security Standard (policy version latest), as the admission controller
# checks it: https://kubernetes.io/docs/concepts/security/pod-security-standards/
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(spec: dict) -> list[str]:
    """Why a pod spec would be refused by a namespace enforcing `restricted` ([] if admitted)."""
    bad = []
    psc = spec.get("securityContext") or {}
    ctrs = [*(spec.get("initContainers") or []), *(spec.get("containers") or []),
            *(spec.get("ephemeralContainers") or [])]
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(flag)
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)}")
    for s in psc.get("sysctls") or []:
        if s["name"] not in _SAFE_SYSCTLS:
            bad.append(f"sysctl {s['name']}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for where, sc in [("pod", psc), *((c["name"], c.get("securityContext") or {}) for c in ctrs)]:
        se = sc.get("seLinuxOptions") or {}
        if se.get("type") not in _SELINUX_TYPES or se.get("user") or se.get("role"):
            bad.append(f"{where}: seLinuxOptions {se}")
        aa = (sc.get("appArmorProfile") or {}).get("type")
        if aa not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: appArmorProfile {aa}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile {pod_seccomp}")
    for c in ctrs:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{where}: hostPort")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp}")
    return bad


def test_restricted_check_itself():
    ok = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
          "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                           "capabilities": {"drop": ["ALL"]}}}],
          "volumes": [{"name": "tmp", "emptyDir": {}}]}
    assert restricted_violations(ok) == []
    import copy

    for breaks in (lambda s: s["securityContext"].pop("seccompProfile"),
                   lambda s: s["securityContext"].pop("runAsNonRoot"),
                   lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                   lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                   lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
                   lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                   lambda s: s.update(hostNetwork=True)):
        spec = copy.deepcopy(ok)
        breaks(spec)
        assert restricted_violations(spec), spec


def test_the_namespace_enforces_restricted(rendered):
    target, objs = rendered
    labels = find(objs, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels.get("pod-security.kubernetes.io/enforce-version", "latest") == "latest"


@pytest.mark.parametrize("target", TARGETS + [TRAINER_TARGET])
def test_every_pod_template_meets_the_restricted_profile(target):
    pods = list(pod_templates(render(target)))
    assert pods
    bad = [f"{name_of(o)}: {v}" for o, spec, _l, _lr in pods for v in restricted_violations(spec)]
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)


def _argo_settings() -> dict:
    data = yaml.safe_load((K8S / "kubeflow" / "workflow-controller-restricted.yaml").read_text())["data"]
    return {k: yaml.safe_load(v) for k, v in data.items()}


def test_kubeflow_pipeline_pods_meet_the_restricted_profile_with_the_argo_settings():
    """A KFP step pod as Argo builds it (no securityContext from KFP): the workflow's pod
    securityContext from workflowDefaults, the executor's on Argo's init/wait containers and
    KFP's launcher init container, mainContainer's on the step's container."""
    argo = _argo_settings()
    executor = {"name": "x", "securityContext": argo["executor"]["securityContext"]}
    main = {"name": "main", "securityContext": argo["mainContainer"]["securityContext"]}
    pod = {"securityContext": argo["workflowDefaults"]["spec"]["securityContext"],
           "initContainers": [dict(executor, name="init"), dict(executor, name="kfp-launcher")],
           "containers": [dict(executor, name="wait"), main],
           "volumes": [{"name": n, "emptyDir": {}} for n in ("var-run-argo", "kfp-launcher", "gcs-scratch")]}
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] == 10001  # the sarflow images' user (docker/)
    # without the settings, the same pod is refused
    assert restricted_violations({"containers": [{"name": "main"}], "initContainers": [{"name": "init"}]})


def test_the_indexed_job_pods_meet_the_restricted_profile():
    from sarflow.data.tile_units import indexed_job_manifest

    job = indexed_job_manifest("s3://sarflow-chips/x.zarr", 3, "ghcr.io/sarflow/sarflow:0.1.0")
    spec = job["spec"]["template"]["spec"]
    assert restricted_violations(spec) == []
    (c,) = spec["containers"]  # a read-only root: HOME and /tmp on the pod's emptyDir
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and {"name": "HOME", "value": "/tmp"} in c["env"]
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]} == {"/tmp": "tmp"}
    assert spec["volumes"] == [{"name": "tmp", "emptyDir": {}}] and spec["automountServiceAccountToken"] is False


def test_writable_paths_are_mounted_volumes(rendered):
    """With a read-only root filesystem, /tmp (and friends) must come from a volume."""
    target, objs = rendered
    for o, spec, _labels, _lr in pod_templates(objs):
        volumes = {v["name"] for v in spec.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates") or []}
        for _ckind, c in containers(spec):
            for m in c.get("volumeMounts") or []:
                assert m["name"] in volumes | claims, f"{name_of(o)} {c['name']}: mount {m['name']}"
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
            if c["image"].startswith("ghcr.io/sarflow/"):
                # Python programs: HOME and /tmp must be writable
                assert "/tmp" in mounts and env.get("HOME") == "/tmp", f"{name_of(o)} {c['name']}"


def test_probes_on_long_running_containers(rendered):
    target, objs = rendered
    bad = []
    checked = 0
    for o, _s, ckind, c, long_running in all_containers(objs):
        if not long_running or ckind != "container":
            continue
        checked += 1
        for probe in ("livenessProbe", "readinessProbe"):
            if not c.get(probe):
                bad.append(f"{name_of(o)} {c['name']}: no {probe}")
    assert checked >= 5
    assert not bad, f"k8s/{target}:\n" + "\n".join(bad)


def test_service_ports_reach_a_container_port(rendered):
    target, objs = rendered
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"].get("selector") or {}
        pods = [(o, s) for o, s, labels, _lr in pod_templates(objs) if sel and sel.items() <= labels.items()]
        assert pods, f"{name_of(svc)} selects no workload"
        ports = {
            p.get("name") for _o, s in pods for c in s["containers"] for p in c.get("ports") or []
        } | {p["containerPort"] for _o, s in pods for c in s["containers"] for p in c.get("ports") or []}
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"{name_of(svc)} {port}"


# ------------------------------------------------------------------------------------- secrets


def test_no_secret_values_are_rendered(rendered):
    target, objs = rendered
    for o in objs:
        if o["kind"] == "Secret":
            assert not o.get("data") and not o.get("stringData"), f"{name_of(o)} carries values"


def _secret_refs(objs):
    for o, _s, _k, c, _lr in all_containers(objs):
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                yield o, ref["name"], ref["key"]
        for ef in c.get("envFrom") or []:
            if ef.get("secretRef"):
                yield o, ef["secretRef"]["name"], None


def test_referenced_secrets_have_an_example_template(rendered):
    """Every Secret the manifests read is created out of band from a committed, empty template."""
    target, objs = rendered
    refs = list(_secret_refs(objs))
    assert {name for _o, name, _k in refs} == SECRETS
    for o, name, key in refs:
        example = K8S / "base" / "secrets" / f"{name}.example.env"
        assert example.is_file(), f"{name_of(o)} reads Secret {name} but {example} is missing"
        keys = {}
        for line in example.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                k, _, v = line.partition("=")
                keys[k.strip()] = v.strip()
        if key is not None:
            assert key in keys, f"{name_of(o)} reads {name}.{key}, not in {example.name}"
        assert all(v == "" for v in keys.values()), f"{example.name} must not carry values"


_SECRET_LINE = re.compile(
    r"""(?ix) (?P<key>[\w.-]*(password|passwd|secret[_-]?access[_-]?key|secret[_-]?key|api[_-]?key|token))
        ["']?[ \t]*[:=][ \t]*["']?(?P<value>[^\s"'#,]+)"""
)
_URI_CREDENTIALS = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s/]+)@")
_KNOWN_LEAKS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bminioadmin\b"),
]
# references and placeholders, not values: $(VAR) / ${VAR} / shell expansion / <...> / ...
_NOT_A_VALUE = re.compile(r"^(\$|\?|\{|-?\}|<|\.\.\.|\u2026|\*+$|true$|false$|[A-Z][A-Z0-9]*_[A-Z0-9_]+$)")


def _secret_literals(text: str) -> list[str]:
    hits = []
    for m in _SECRET_LINE.finditer(text):
        if not _NOT_A_VALUE.match(m.group("value")):
            hits.append(m.group(0))
    for m in _URI_CREDENTIALS.finditer(text):
        if not _NOT_A_VALUE.match(m.group("password")):
            hits.append(m.group(0))
    for pat in _KNOWN_LEAKS:
        hits += pat.findall(text)
    return hits


def test_secret_literal_scan_itself():
    assert _secret_literals("POSTGRES_PASSWORD: hunter2")
    assert _secret_literals("password=hunter2")
    assert _secret_literals("value: postgresql://mlflow:hunter2@postgres:5432/mlflow")
    assert _secret_literals("MINIO_ROOT_USER=minioadmin")
    assert not _secret_literals("value: postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@postgres:5432/mlflow")
    assert not _secret_literals("POSTGRES_PASSWORD=\nkey: AWS_SECRET_ACCESS_KEY\n")
    assert not _secret_literals(': "${MINIO_ROOT_PASSWORD:?}"')
    assert not _secret_literals('[ -n "${AWS_SECRET_ACCESS_KEY:-}" ]')
    assert not _secret_literals("automountServiceAccountToken: false")
    assert not _secret_literals('{"AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}')
    assert not _secret_literals("postgresql://mlflow:\u2026@postgres:5432/mlflow")
    assert _secret_literals("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG")
    assert _secret_literals('{"token": "abc123"}')


def test_no_secret_literals_in_k8s_and_docker_files():
    files = [p for d in (K8S, DOCKER) for p in d.rglob("*") if p.is_file()]
    assert files
    leaks = {str(p.relative_to(ROOT)): hits for p in files if (hits := _secret_literals(p.read_text()))}
    assert not leaks, leaks
    # filled-in env files are gitignored next to the templates
    ignore = (K8S / ".gitignore").read_text().split()
    assert "*.env" in ignore and "!*.example.env" in ignore
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "--", "k8s"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert not [f for f in tracked if f.endswith(".env") and not f.endswith(".example.env")]


# ----------------------------------------------------------------------------- network policy


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
    return True


def _port_ok(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    # an entry without `port` admits every port of its protocol; `endPort` makes a range
    return not ports or any(
        p.get("protocol", "TCP") == "TCP"
        and ("port" not in p or p["port"] == port or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in ports
    )


def _peer_is_pod(peer: dict, labels: dict) -> bool:
    """A same-namespace pod peer (no namespaceSelector / ipBlock) that matches `labels`."""
    return "podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], labels)


def allowed(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Would a TCP connection from pod `src` to pod `dst`:port in the namespace be allowed?"""

    def direction(kind: str, selected: dict, peer_labels: dict, peers_key: str) -> bool:
        applying = [
            p for p in policies
            if kind in p["spec"].get("policyTypes", []) and _selects(p["spec"]["podSelector"], selected)
        ]
        if not applying:
            return True
        return any(
            _port_ok(rule, port)
            # a rule without peers admits every peer
            and (not rule.get(peers_key) or any(_peer_is_pod(peer, peer_labels) for peer in rule[peers_key]))
            for p in applying
            for rule in p["spec"].get(kind.lower()) or []
        )

    return direction("Egress", src, dst, "to") and direction("Ingress", dst, src, "from")


def test_default_deny_network_policy_exists(rendered):
    target, objs = rendered
    deny = [
        o for o in objs
        if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"] in ({}, None)
        and {"Ingress", "Egress"} <= set(o["spec"].get("policyTypes", []))
        and not o["spec"].get("ingress") and not o["spec"].get("egress")
    ]
    assert deny, f"k8s/{target} has no default-deny (ingress + egress) NetworkPolicy"


def test_network_policies_allow_exactly_the_needed_flows(rendered):
    target, objs = rendered
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = {}
    for o, _s, labels, _lr in pod_templates(objs):
        pods[labels["app.kubernetes.io/name"]] = labels
    pipeline = {"sarflow.io/pipeline": "true", "workflows.argoproj.io/workflow": "wf-1"}
    stranger = {"app.kubernetes.io/name": "something-else"}
    pods["pipeline"] = pipeline
    pods["stranger"] = stranger
    # a promote task (pipelines/platform.py adds the lock label) and a TrainJob pod (the runtime's labels)
    pods["promote"] = {**pipeline, "sarflow.io/promotion-lock": "true"}
    pods["trainjob"] = trainjob_pod_labels()
    pods["indexed-job"] = indexed_job_pod_labels()
    service_port = {"minio": 9000, "mlflow": 5000, "postgres": 5432, "redis": 6379, "feast": 6566}
    needed = {
        ("pipeline", "minio"), ("pipeline", "mlflow"), ("pipeline", "redis"), ("pipeline", "feast"),
        ("promote", "minio"), ("promote", "mlflow"), ("promote", "redis"), ("promote", "feast"),
        ("promote", "postgres"),
        ("indexed-job", "minio"), ("indexed-job", "mlflow"), ("indexed-job", "redis"), ("indexed-job", "feast"),
        ("trainjob", "minio"), ("trainjob", "mlflow"),
        ("mlflow", "postgres"), ("mlflow", "minio"),
        ("feast", "redis"), ("feast", "minio"),
        ("minio-buckets", "minio"),
    }
    for src in pods:
        for dst, port in service_port.items():
            got = allowed(policies, pods[src], pods[dst], port)
            assert got == ((src, dst) in needed), f"k8s/{target}: {src} -> {dst}:{port} allowed={got}"
    # the right service, wrong port
    assert not allowed(policies, pipeline, pods["minio"], 9001)
    assert not allowed(policies, pipeline, pods["postgres"], 5432)
    assert not allowed(policies, pods["promote"], pods["postgres"], 5433)
    # TrainJob pods reach each other (rendezvous on PET_MASTER_PORT 29500, NCCL on any port),
    # nobody else reaches them
    trainjob = pods["trainjob"]
    other_node = {**trainjob, "jobset.sigs.k8s.io/job-index": "1"}
    for port in (29500, 41234):
        assert allowed(policies, trainjob, other_node, port)
        for src in ("pipeline", "stranger", "mlflow", "minio"):
            assert not allowed(policies, pods[src], trainjob, port), src
        assert not allowed(policies, trainjob, pods["stranger"], port)


def trainjob_pod_labels() -> dict:
    """The labels a TrainJob pod on the sarflow runtime carries (plus what JobSet adds)."""
    rt = render(TRAINER_TARGET)
    (labels,) = [labels for _o, _s, labels, _lr in pod_templates(rt)]
    return {**labels, "jobset.sigs.k8s.io/jobset-name": "sarflow-pretrain", "jobset.sigs.k8s.io/job-index": "0"}


def indexed_job_pod_labels() -> dict:
    from sarflow.data.tile_units import indexed_job_manifest

    job = indexed_job_manifest("s3://sarflow-chips/x.zarr", 2, "ghcr.io/sarflow/sarflow:0.1.0")
    return {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}


_PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


def test_only_argo_pods_reach_the_api_server_and_only_at_its_address(rendered):
    """Issue 16: no blanket private-range 443/6443 egress; the API server's address only, for the
    Argo/KFP pods (executor sidecar, driver, the launcher tasks), not services or worker pods."""
    import ipaddress

    target, objs = rendered
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    ip_rules = [(p, rule) for p in policies for rule in p["spec"].get("egress") or []
                if any("ipBlock" in peer for peer in rule.get("to") or [])]
    assert ip_rules, f"k8s/{target}: no API server egress"
    for p, rule in ip_rules:
        assert p["metadata"]["name"] == "kube-apiserver-egress", name_of(p)
        for peer in rule["to"]:
            net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            assert str(net) not in _PRIVATE_RANGES and net.prefixlen >= 16, f"k8s/{target}: {net}"
        assert {port["port"] for port in rule["ports"]} <= {443, 6443}
        argo_pod = {"workflows.argoproj.io/workflow": "wf-1", "sarflow.io/pipeline": "true"}
        assert _selects(p["spec"]["podSelector"], argo_pod)
        worker_pods = [labels for _o, _s, labels, _lr in pod_templates(objs)]
        worker_pods += [trainjob_pod_labels(), indexed_job_pod_labels()]
        for labels in worker_pods:
            assert not _selects(p["spec"]["podSelector"], labels), labels
    # no other policy opens egress beyond pods/namespaces (no empty `to`, no ipBlock)
    for p in policies:
        for rule in p["spec"].get("egress") or []:
            assert rule.get("to"), f"{name_of(p)}: egress to anywhere"


def test_every_pod_may_resolve_dns(rendered):
    target, objs = rendered
    dns = [
        o for o in objs
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"] in ({}, None)
        for rule in o["spec"].get("egress") or []
        if _port_ok(rule, 53)
        and any(
            (peer.get("podSelector") or {}).get("matchLabels", {}).get("k8s-app") == "kube-dns"
            for peer in rule.get("to") or []
        )
    ]
    assert dns, f"k8s/{target}: no DNS egress to kube-dns for all pods"


# ----------------------------------------------------------------------------------------- RBAC


def test_pipeline_runner_role_is_least_privilege(rendered):
    target, objs = rendered
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    find(objs, "ServiceAccount", "sarflow-pipeline-runner")
    role = find(objs, "Role", "sarflow-pipeline-runner")
    binding = find(objs, "RoleBinding", "sarflow-pipeline-runner")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sarflow-pipeline-runner"
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sarflow-pipeline-runner", "namespace": NAMESPACE}
    ]
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]
        assert "impersonate" not in rule["verbs"]
        if {"secrets", "configmaps"} & set(rule["resources"]):
            assert rule["verbs"] == ["get"] and rule.get("resourceNames"), f"unscoped read: {rule}"
            assert "sarflow-minio" not in rule["resourceNames"]
            assert "sarflow-postgres" not in rule["resourceNames"]
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert "pods/exec" not in rule["resources"]
        # issue 16: the pipeline could delete any PVC, MinIO's and PostgreSQL's included; the only
        # deletes are of the launchers' own jobs (a rerun replaces a finished job of that name)
        assert "persistentvolumeclaims" not in rule["resources"], rule
        if "delete" in rule["verbs"]:
            assert (rule["apiGroups"], rule["resources"]) in (
                (["trainer.kubeflow.org"], ["trainjobs"]), (["batch"], ["jobs"])), rule
    # what the launchers call: tile_units.run_indexed_job (create_namespaced_job,
    # read_namespaced_job_status, delete_namespaced_job) and the TrainJob launcher (create, get, delete)
    def verbs(group, resource):
        return {v for r in role["rules"] if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    assert verbs("batch", "jobs") == {"create", "get", "watch", "delete"}
    assert verbs("batch", "jobs/status") == {"get"}
    assert verbs("trainer.kubeflow.org", "trainjobs") == {"create", "get", "watch", "delete"}
    assert not verbs("batch", "cronjobs") and not verbs("", "persistentvolumeclaims")
    # service pods do not carry an API token they never use
    for o, spec, _labels, _lr in pod_templates(objs):
        assert spec.get("automountServiceAccountToken") is False, name_of(o)


# ------------------------------------------------------------------------------- the services


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_service_wiring(rendered):
    target, objs = rendered
    # buckets
    job = find(objs, "Job", "minio-buckets")
    mc = job["spec"]["template"]["spec"]["containers"][0]
    assert _env(mc)["BUCKETS"].split() == BUCKETS
    setup = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("minio-bucket-setup"))
    assert "mc mb --ignore-existing" in setup["data"]["setup-buckets.sh"].replace("$MC", "mc")
    assert all(b in setup["data"]["sarflow-rw-policy.json"] for b in BUCKETS)
    # MLflow: PostgreSQL backend, proxied artifacts in s3://sarflow-mlflow, MinIO endpoint
    mlflow = find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = mlflow["command"] + mlflow["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://sarflow-mlflow" in args
    env = _env(mlflow)
    # basic-auth (issue 16): settings from the ConfigMap (no secret in it), admin from the Secret
    assert "--app-name=basic-auth" in args
    auth_ini = find_prefixed(objs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(auth_ini)
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert ini["mlflow"]["database_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"  # PGPASSWORD
    assert "admin_password" not in ini["mlflow"]
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "sarflow-postgres", "key": "POSTGRES_PASSWORD"}}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"secretKeyRef": {"name": "sarflow-mlflow", "key": "MLFLOW_TRACKING_PASSWORD"}}
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == {"secretKeyRef": {"name": "sarflow-mlflow", "key": "MLFLOW_TRACKING_USERNAME"}}
    mounts = {m["name"]: m["mountPath"] for m in mlflow["volumeMounts"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == mounts["auth"] + "/basic_auth.ini"
    # Redis: requirepass from the Secret; the probe authenticates through REDISCLI_AUTH
    redis = find(objs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    rargs = redis["args"]
    assert rargs[rargs.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "--protected-mode" not in rargs
    renv = _env(redis)
    for key in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert renv[key] == {"secretKeyRef": {"name": "sarflow-redis", "key": "REDIS_PASSWORD"}}
    # PostgreSQL: the promotion lock's role from the first-start script, password from the Secret
    pg = find(objs, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    assert _env(pg["containers"][0])["PROMOTION_LOCK_PASSWORD"] == {
        "secretKeyRef": {"name": "sarflow-postgres", "key": "PROMOTION_LOCK_PASSWORD"}}
    init = next(v for v in pg["volumes"] if v["name"] == "init")["configMap"]["name"]
    assert "10-promotion-lock.sh" in find(objs, "ConfigMap", init)["data"]
    assert {m["name"]: m["mountPath"] for m in pg["containers"][0]["volumeMounts"]}["init"] == "/docker-entrypoint-initdb.d"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@postgres:5432/")
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "sarflow-postgres", "key": "POSTGRES_PASSWORD"}}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # k8s expands $(VAR) only from variables defined earlier in the list
    names = [e["name"] for e in mlflow["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert "mlflow.sarflow.svc:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # Feast: feature server from the project image over the ConfigMap repo
    feast = find(objs, "Deployment", "feast")["spec"]["template"]["spec"]
    fc = feast["containers"][0]
    assert fc["image"].startswith("ghcr.io/sarflow/sarflow:")
    assert fc["command"][0] == "feast" and "serve" in fc["command"]
    assert "--host=0.0.0.0" in fc["args"]
    vol = next(v for v in feast["volumes"] if v["name"] == "feature-repo")
    assert vol["configMap"]["name"] == "sarflow-feast-repo"
    # feature_store.yaml: Redis online, file offline, S3 registry
    fs = yaml.safe_load(find(objs, "ConfigMap", "sarflow-feast-repo")["data"]["feature_store.yaml"])
    # Feast expands ${REDIS_PASSWORD} from the pod's environment when it reads the file
    assert fs["online_store"] == {"type": "redis", "connection_string": "redis:6379,password=${REDIS_PASSWORD}"}
    assert fs["offline_store"]["type"] == "file"
    assert fs["registry"]["path"].startswith("s3://sarflow-feast/")
    # pipeline env contract
    penv = find(objs, "ConfigMap", "sarflow-pipeline-env")["data"]
    for key in PIPELINE_ENV:
        assert penv.get(key), key
    assert penv["AWS_ENDPOINT_URL"].endswith(":9000") and penv["MLFLOW_TRACKING_URI"].endswith(":5000")
    # the promotion lock: PostgreSQL, the lock role, no password in the URL (PGPASSWORD from the Secret)
    from sarflow.mlops.locks import LOCK_ENV, _is_postgres

    lock = penv[LOCK_ENV]
    assert _is_postgres(lock) and lock == "postgresql://sarflow_lock@postgres.sarflow.svc:5432/sarflow_locks"


def find_prefixed(objs: list[dict], kind: str, prefix: str) -> dict:
    """A hash-suffixed generated object (`mlflow-auth-<hash>`)."""
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    assert len(hits) == 1, f"expected one {kind}/{prefix}-<hash>, found {len(hits)}"
    return hits[0]


def test_the_image_carries_mlflows_auth_extra():
    """`mlflow server --app-name=basic-auth` imports Flask-WTF (mlflow[auth]); the image installs
    requirements.lock, so the lock must pin it."""
    lock = (ROOT / "requirements.lock").read_text().lower()
    assert re.search(r"^flask-wtf==", lock, re.M) and re.search(r"^wtforms==", lock, re.M)
    assert re.search(r"^mlflow==", lock, re.M)
    assert '"mlflow[auth]' in (ROOT / "pyproject.toml").read_text()  # the services extra the images install
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert '".[services]"' in (ROOT / "docker" / dockerfile).read_text(), dockerfile


def test_feast_server_gets_the_redis_password():
    feast = find(render("base"), "Deployment", "feast")["spec"]["template"]["spec"]["containers"][0]
    assert _env(feast)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "sarflow-redis", "key": "REDIS_PASSWORD"}}


def test_readme_documents_deploy_and_env_contract():
    text = (K8S / "README.md").read_text()
    for needle in [
        "kubectl apply -k k8s/overlays/local", "kubectl apply -k k8s/overlays/gpu", "--from-env-file",
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI",
        "SARFLOW_FEAST_REPO", *sorted(SECRETS), "SARFLOW_PROMOTION_LOCK", "PROMOTION_LOCK_PASSWORD",
        "components/images", "workflow-controller-restricted.yaml", "sarflow-torch-distributed",
        "kube-apiserver-egress", "--app-name=basic-auth", "requirepass",
    ]:
        assert needle in text, needle


# ------------------------------------------------------------------------------------ overlays


def _pvc_sizes(objs):
    return {
        (o["metadata"]["name"], t["metadata"]["name"]): _qty(t["spec"]["resources"]["requests"]["storage"])
        for o in objs if o["kind"] == "StatefulSet"
        for t in o["spec"].get("volumeClaimTemplates") or []
    }


def _total_requests(objs, resource):
    total = 0.0
    for o, _s, _k, c, _lr in all_containers(objs):
        if o["kind"] == "Job":
            continue
        total += _qty(c["resources"]["requests"][resource]) * o["spec"].get("replicas", 1)
    return total


def test_local_overlay_is_small():
    base, local = render("base"), render("overlays/local")
    for o in local:
        if o["kind"] in ("Deployment", "StatefulSet"):
            assert o["spec"].get("replicas", 1) == 1, name_of(o)
    sizes = _pvc_sizes(local)
    assert sizes and all(v <= 10 * 2**30 for v in sizes.values()), sizes
    assert all(sizes[k] < v for k, v in _pvc_sizes(base).items())
    assert _total_requests(local, "cpu") < _total_requests(base, "cpu")
    assert _total_requests(local, "memory") <= 2 * 2**30
    redis = find(local, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert _qty(_env(redis)["REDIS_MAXMEMORY"].replace("mb", "Mi")) < _qty(redis["resources"]["limits"]["memory"])


def _gpu_containers(objs):
    return [
        (o, spec, c)
        for o, spec, _l, _lr in pod_templates(objs)
        for c in spec["containers"]
        if "nvidia.com/gpu" in (c["resources"].get("limits") or {})
    ]


def test_gpu_overlay_schedules_on_the_gpu_pool():
    objs = render("overlays/gpu")
    gpu = _gpu_containers(objs)
    assert gpu, "no container with an nvidia.com/gpu limit"
    for o, spec, c in gpu:
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert str(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == str(limits["nvidia.com/gpu"])
        assert any(
            t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
            and t.get("operator") in ("Exists", "Equal")
            for t in spec.get("tolerations") or []
        ), f"{name_of(o)}: no toleration for the nvidia.com/gpu taint"
        selector = spec.get("nodeSelector") or {}
        assert selector.get("nvidia.com/gpu.present") == "true" or "cloud.google.com/gke-accelerator" in selector
        assert c["image"].startswith("ghcr.io/sarflow/sarflow-gpu:")
    smoke = find(objs, "Job", "gpu-smoke-test")["spec"]["template"]["spec"]["containers"][0]
    assert "torch.cuda.is_available()" in " ".join(smoke["command"])
    quota = find(objs, "ResourceQuota", "sarflow-gpu")
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= 1
    # bigger shared services than the base
    base = render("base")
    for name in ("mlflow", "feast"):
        big = find(objs, "Deployment", name)
        small = find(base, "Deployment", name)
        b = big["spec"]["template"]["spec"]["containers"][0]["resources"]
        s = small["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert _qty(b["limits"]["memory"]) > _qty(s["limits"]["memory"]), name
        assert big["spec"]["replicas"] >= 2


def test_only_the_gpu_overlay_asks_for_gpus():
    assert not _gpu_containers(render("base"))
    assert not _gpu_containers(render("overlays/local"))


# ----------------------------------------------------------------------------------- Dockerfiles


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _from_images(text: str) -> list[str]:
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    images = []
    stages = set()
    for m in re.finditer(r"^FROM\s+(?:--\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
        image = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
        if image not in stages:
            images.append(image)
        if m.group(2):
            stages.add(m.group(2))
    return images


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_is_pinned_minimal_and_non_root(name):
    text = _dockerfile(name)
    images = _from_images(text)
    assert images, "no FROM"
    for image in images:
        assert image_problem(image) is None, f"{name}: FROM {image} {image_problem(image)}"
        assert image.startswith("python:3.11."), image
    # copies only what the install needs, installs under the lock
    copies = " ".join(re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M))
    for needed in ("pyproject.toml", "requirements.lock", "src/"):
        assert needed in copies, f"{name} does not copy {needed}"
    assert re.search(r'pip install -c requirements\.lock "\.\[services\]"', text)  # the package + the services extra
    assert "download.pytorch.org/whl/" in text
    # non-root user 10001 in the final stage
    final = text[text.rfind("\nFROM "):]
    assert re.search(r"useradd[^\n]*--uid 10001", final)
    assert re.search(r"^USER\s+10001(:10001)?\s*$", final, re.M)
    assert re.search(r"^WORKDIR\s+/", final, re.M)
    # no credentials baked in, no latest
    assert not re.search(r"^(ENV|ARG)\s+[^\n]*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, re.M | re.I)
    assert not _secret_literals(text)


def test_gpu_dockerfile_installs_a_cuda_torch():
    text = _dockerfile("Dockerfile.gpu")
    assert re.search(r"^ARG TORCH_CUDA=cu12\d+", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "torch.version.cuda" in text
    cpu = _dockerfile("Dockerfile")
    assert "download.pytorch.org/whl/cpu" in cpu


def test_dockerfile_torch_pin_comes_from_the_lock():
    """The Dockerfiles read torch's version from requirements.lock: check that line exists."""
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", lock, re.M)
    for name in ("Dockerfile", "Dockerfile.gpu"):
        assert "sed -n 's/^torch==//p' requirements.lock" in _dockerfile(name)


# ------------------------------------------------- configs parsed by the real programs (slow)


def _expand(value: str, env: dict) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def _container_env(container: dict) -> dict:
    env = {}
    for e in container.get("env") or []:
        value = e.get("value", "dummy-from-secret")
        env[e["name"]] = _expand(value, env)
    return env


@pytest.mark.slow
def test_mlflow_server_accepts_the_manifest_arguments(monkeypatch, tmp_path):
    """Parse the container's command line and env with MLflow's own CLI (same version as the image)."""
    import mlflow.cli

    c = find(render("overlays/local"), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = _container_env(c)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert c["command"] == ["mlflow", "server"]
    args = [_expand(a, env) for a in c["args"]]
    ctx = mlflow.cli.cli.make_context("mlflow", ["server", *args])
    server = mlflow.cli.cli.get_command(ctx, "server")
    params = server.make_context("server", list(args), parent=ctx).params
    assert params["host"] == "0.0.0.0" and int(params["port"]) == 5000
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == "s3://sarflow-mlflow"
    assert params["backend_store_uri"] == "postgresql+psycopg2://mlflow:dummy-from-secret@postgres:5432/mlflow"
    assert int(params["workers"]) == 1
    assert params["app_name"] == "basic-auth"
    # the auth settings file as MLflow's own reader sees it (admin from the env, not the file);
    # loaded from its file: importing the mlflow.server.auth package needs Flask-WTF
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_mlflow_auth_config", Path(mlflow.cli.__file__).parents[1] / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    read_auth_config = auth_config.read_auth_config

    ini = find_prefixed(render("overlays/local"), "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    path = tmp_path / "basic_auth.ini"
    path.write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
    cfg = read_auth_config()
    assert cfg.admin_username == "pipeline" and cfg.admin_password == "from-the-secret"
    assert cfg.default_permission == "NO_PERMISSIONS"
    assert cfg.database_uri.startswith("postgresql+psycopg2://mlflow@postgres:5432/")


@pytest.mark.slow
def test_feast_accepts_the_manifest_command_and_config(monkeypatch, tmp_path):
    """Parse `feast ... serve ...` with Feast's CLI and feature_store.yaml with its RepoConfig."""
    from feast.cli.cli import cli

    objs = render("overlays/local")
    c = find(objs, "Deployment", "feast")["spec"]["template"]["spec"]["containers"][0]
    env = _container_env(c)
    argv = [_expand(a, env) for a in c["command"][1:] + c["args"]]
    serve_at = argv.index("serve")
    ctx = cli.make_context("feast", list(argv))  # click consumes the list it is given
    assert ctx.params["chdir"] == "/etc/sarflow/feature_repo"
    serve = cli.get_command(ctx, "serve")
    params = serve.make_context("serve", argv[serve_at + 1:], parent=ctx).params
    assert params["host"] == "0.0.0.0" and params["port"] == 6566 and params["workers"] == 1

    # read the file the way `feast serve` does: ${REDIS_PASSWORD} from the environment
    from feast.repo_config import load_repo_config

    (tmp_path / "feature_store.yaml").write_text(find(objs, "ConfigMap", "sarflow-feast-repo")["data"]["feature_store.yaml"])
    monkeypatch.setenv("REDIS_PASSWORD", "from-the-secret")
    config = load_repo_config(tmp_path, tmp_path / "feature_store.yaml")
    assert type(config.online_store).__name__ == "RedisOnlineStoreConfig"
    assert config.online_store.connection_string == "redis:6379,password=from-the-secret"
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(config.online_store.connection_string)
    assert params["password"] == "from-the-secret" and nodes[0]["host"] == "redis"
    assert config.offline_store.type == "file"
    assert config.registry.path == "s3://sarflow-feast/registry/registry.db"


# ------------------------------------------------------------------ the promotion lock (issue 16)


def test_pipeline_platform_wires_the_promotion_lock():
    """What pipelines/platform.py gives promote tasks matches what k8s/ admits and provides."""
    import platform as _stdlib_platform  # noqa: F401  (pipelines.platform is a different module)

    from pipelines import platform

    objs = render("base")
    env = find(objs, "ConfigMap", "sarflow-pipeline-env")["data"]
    assert set(platform.PIPELINE_ENV) <= set(env), set(platform.PIPELINE_ENV) - set(env)
    assert "SARFLOW_PROMOTION_LOCK" in platform.PIPELINE_ENV
    secret, keys = platform.LOCK_SECRET
    assert keys == {"PROMOTION_LOCK_PASSWORD": "PGPASSWORD"}
    example = (K8S / "base" / "secrets" / f"{secret}.example.env").read_text()
    assert re.search(r"^PROMOTION_LOCK_PASSWORD=$", example, re.M)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = {labels["app.kubernetes.io/name"]: labels for _o, _s, labels, _lr in pod_templates(objs)}
    task = dict([platform.POD_LABEL, ("workflows.argoproj.io/workflow", "wf")])
    assert not allowed(policies, task, pods["postgres"], 5432)
    assert allowed(policies, {**task, **dict([platform.LOCK_POD_LABEL])}, pods["postgres"], 5432)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fresh_postgres():
    """A throwaway PostgreSQL server (initdb + pg_ctl; as user `postgres` when run as root) in a
    short folder of its own under the temp folder (pytest's tmp_path is private to root, and the
    socket path must stay short)."""
    import os
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="sarflow-pg-"))

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not on PATH")
    as_user = []
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(tmp_path, pw.pw_uid, pw.pw_gid)
        tmp_path.chmod(0o755)
    data, port = tmp_path / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "mlflow", "--auth-local=trust",
                    "--auth-host=scram-sha-256"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(tmp_path / "log"), "-o",
                    f"-p {port} -k {tmp_path} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=60)
    subprocess.run([*as_user, "createdb", "-h", str(tmp_path), "-p", str(port), "-U", "mlflow", "mlflow"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield {"socket": str(tmp_path), "port": port}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_postgres_init_script_gives_the_lock_role_the_lock_and_nothing_else(fresh_postgres, monkeypatch):
    """Run k8s/base/postgres/10-promotion-lock.sh as the image's entrypoint would, on a real server;
    then the gate's lock (sarflow.mlops.locks) works as sarflow_lock with PGPASSWORD, a second
    holder waits, and the role cannot open MLflow's database."""
    import os

    import psycopg2

    from sarflow.errors import InputError
    from sarflow.mlops.locks import promotion_lock

    script = K8S / "base" / "postgres" / "10-promotion-lock.sh"
    env = {**os.environ, "POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow", "PGHOST": fresh_postgres["socket"],
           "PGPORT": str(fresh_postgres["port"]), "PROMOTION_LOCK_PASSWORD": "lock-pw-123"}
    proc = subprocess.run(["bash", "-c", f"source {script}"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # an empty password refuses to initialise
    proc = subprocess.run(["bash", "-c", f"source {script}"], env={**env, "PROMOTION_LOCK_PASSWORD": ""},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "PROMOTION_LOCK_PASSWORD" in proc.stderr

    port = fresh_postgres["port"]
    lock_uri = f"postgresql://sarflow_lock@127.0.0.1:{port}/sarflow_locks"  # as in the ConfigMap
    monkeypatch.setenv("PGPASSWORD", "lock-pw-123")
    with promotion_lock("model-a", "http://mlflow:5000", lock_uri=lock_uri, timeout_s=5) as where:
        assert where == lock_uri
        with pytest.raises(InputError, match="held the lock"):
            with promotion_lock("model-a", "http://mlflow:5000", lock_uri=lock_uri, timeout_s=0.5):
                pass
    with psycopg2.connect(host="127.0.0.1", port=port, user="sarflow_lock", dbname="sarflow_locks") as conn:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("CREATE TABLE public.t (x int)")
    for db in ("mlflow", "postgres"):
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            psycopg2.connect(host="127.0.0.1", port=port, user="sarflow_lock", dbname=db)
    monkeypatch.setenv("PGPASSWORD", "wrong")
    with pytest.raises(InputError, match="cannot reach"):
        with promotion_lock("model-a", "http://mlflow:5000", lock_uri=lock_uri, timeout_s=1):
            pass


def test_redis_with_the_manifest_arguments_refuses_clients_without_the_password(tmp_path):
    """Start redis-server with the Deployment's arguments (the Secret's value substituted as the
    kubelet would); Feast's connection string with the password gets in, a client without it not."""
    import time

    redis_server = shutil.which("redis-server")
    if not redis_server:
        pytest.skip("redis-server not on PATH")
    redis = pytest.importorskip("redis")
    from feast.infra.online_stores.redis import RedisOnlineStore

    c = find(render("overlays/local"), "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    env = {**_container_env(c), "REDIS_PASSWORD": "s3cret-from-secret"}
    port = _free_port()
    args = [_expand(a, env) for a in c["args"]]
    assert args[0] == "redis-server"
    proc = subprocess.Popen([redis_server, *args[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nodes, params = RedisOnlineStore._parse_connection_string(
            f"127.0.0.1:{port},password={env['REDIS_PASSWORD']}")
        client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), password=params["password"])
        for _ in range(100):
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert client.ping()
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_trainer_runtimes_job_template_validates_against_the_kubernetes_schema(version):
    """The runtime is a CRD object (no schema in kubernetes-validate): validate its replicated
    Job template as the batch/v1 Job JobSet creates from it, strictly."""
    import kubernetes_validate

    (rt,) = render(TRAINER_TARGET)
    assert rt["kind"] == "ClusterTrainingRuntime" and rt["metadata"]["name"] == "sarflow-torch-distributed"
    assert "namespace" not in rt["metadata"]  # cluster-scoped
    for rjob in rt["spec"]["template"]["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rjob["name"], **rjob["template"].get("metadata", {})},
               "spec": rjob["template"]["spec"]}
        kubernetes_validate.validate(job, version, strict=True)
    (node,) = [c for _o, spec, _l, _lr in pod_templates([rt]) for c in spec["containers"]]
    assert node["name"] == "node"  # the container the Trainer overrides with the TrainJob's trainer
    env = _env(node)
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"secretKeyRef": {"name": "sarflow-mlflow", "key": "MLFLOW_TRACKING_PASSWORD"}}
    from sarflow.training.distributed import train_job

    job = train_job("x", "s3://sarflow-chips/c.zarr", "img", runtime=rt["metadata"]["name"])
    assert job["spec"]["runtimeRef"]["name"] == "sarflow-torch-distributed"
    assert job["spec"]["runtimeRef"].get("kind", "ClusterTrainingRuntime") == rt["kind"]

"""Dataset versions with DVC: `dvc add` the chip store, push it to a remote (MinIO/S3 on a
cluster, a folder for the embedded default), and report the version later stages record:
the git commit of the repository and the DVC hash of the store directory.

DVC is driven through its command line (`python -m dvc`), its stable interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sarflow.errors import SarflowError, StorageError

S3_CHECKSUM_ENV = {  # recent botocore sends checksums that S3-compatible servers may reject
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **S3_CHECKSUM_ENV, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SarflowError(f"dvc {' '.join(args)} failed in {cwd}: {dvc_error(proc)}")
    return proc


def dvc_error(proc: subprocess.CompletedProcess) -> str:
    """DVC's own words for a failure: its ERROR lines (without "unexpected error - "), not its
    support banner; else its last lines. (`-q` makes DVC print the banner only: run it without.)"""
    lines = [x.strip() for x in (proc.stderr + "\n" + proc.stdout).splitlines() if x.strip()]
    lines = [x for x in lines if "dvc.org/support" not in x]
    errors = [x for x in lines if x.startswith("ERROR")]
    picked = errors or lines[-3:]
    text = " | ".join(x.removeprefix("ERROR:").strip().removeprefix("unexpected error - ") for x in picked)
    return text or f"exit status {proc.returncode}, no message"


def remote_endpoint(url: str) -> str:
    """Where a DVC remote lives, for messages: the S3 endpoint of an s3:// remote, else the URL."""
    if url.startswith("s3://"):
        from sarflow.data.storage import s3_settings

        return f"{url} at {s3_settings().endpoint_url}"
    return url


def find_repo(start: Path) -> Path | None:
    for p in [start, *start.parents]:
        if (p / ".dvc").is_dir():
            return p
    return None


def git_commit(repo: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def init_repo(root: Path) -> Path:
    """A DVC repository at `root` (inside git when `root` is in a git work tree, else --no-scm)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        in_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
        scm_root = Path(in_git.stdout.strip()) if in_git.returncode == 0 else None
        ignored = scm_root and subprocess.run(["git", "check-ignore", "-q", str(root)], cwd=root).returncode == 0
        if ignored:  # e.g. demo-output/ in the project checkout: a standalone data repository
            scm_root = None
        dvc(["init", "-q", "--subdir"] if scm_root and scm_root != root.resolve() else
            ["init", "-q"] if scm_root else ["init", "-q", "--no-scm"], cwd=root)
    return root


def configure_remote(repo: Path, url: str, name: str = "storage") -> None:
    dvc(["remote", "add", "-f", "-d", name, url], cwd=repo)
    endpoint = os.environ.get("SARFLOW_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        dvc(["remote", "modify", name, "endpointurl", endpoint], cwd=repo)


def store_hash(repo: Path, store: Path) -> str:
    """The DVC md5 of the store directory, from its .dvc file or from dvc.lock."""
    rel = os.path.relpath(store.resolve(), repo.resolve())
    dvcfile = store.with_name(store.name + ".dvc")
    if dvcfile.is_file():
        outs = yaml.safe_load(dvcfile.read_text())["outs"]
        return outs[0]["md5"]
    lock = repo / "dvc.lock"
    if lock.is_file():
        for stage in (yaml.safe_load(lock.read_text()).get("stages") or {}).values():
            for out in stage.get("outs", []):
                if out["path"] == rel:
                    return out["md5"]
    raise SarflowError(f"{store}: not tracked by DVC (no {dvcfile.name} and not an output in dvc.lock)")


S3_MANIFEST_SUFFIX = ".manifest.json"


def s3_version_manifest(uri: str) -> dict:
    """The version of a finished store on S3, without downloading it: the sha256 of every object's
    key, size and ETag (sorted), written beside the store as `<uri>.manifest.json` (outside its
    prefix); the version changes if any object of the store is rewritten, added or removed."""
    import hashlib

    from sarflow.data.chipstore import open_chip_group
    from sarflow.data.storage import s3_filesystem

    uri = uri.rstrip("/")
    attrs = dict(open_chip_group(uri).attrs)  # refuses a store that is not finished (no `chips`)
    if "chips" not in attrs:
        raise SarflowError(f"{uri}: not a finished chip store (no `chips` attribute): finalize it first")
    fs = s3_filesystem()
    prefix = uri[len("s3://"):]
    objects = [{"key": k[len(prefix) + 1:], "size": int(d["size"]), "etag": str(d.get("ETag", "")).strip('"')}
               for k, d in sorted(fs.find(prefix, detail=True).items())]
    digest = hashlib.sha256("\n".join(f"{o['key']}\t{o['size']}\t{o['etag']}" for o in objects).encode()).hexdigest()
    manifest = {"store": uri, "version": f"s3sha256:{digest}", "catalog_hash": attrs.get("catalog_hash"),
                "chips": attrs["chips"], "objects": objects}
    fs.pipe_file(prefix + S3_MANIFEST_SUFFIX, json.dumps(manifest, indent=1).encode())
    return manifest


def s3_store_version(uri: str) -> str | None:
    """The version recorded beside an S3 store by `s3_version_manifest` (None when there is none)."""
    from sarflow.data.storage import s3_filesystem

    try:
        return json.loads(s3_filesystem().cat_file(uri.rstrip("/")[len("s3://"):] + S3_MANIFEST_SUFFIX))["version"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def version_store(store: str | Path, remote: str | None = None, repo: str | Path | None = None,
                  push: bool = True) -> dict:
    """Tracks the store with DVC (unless a dvc.yaml stage already does), pushes it when a
    remote is configured, and returns the dataset version. A store on s3:// is versioned in
    place by its object manifest (`s3_version_manifest`: nothing is downloaded)."""
    from sarflow.data.chipstore import open_store

    if str(store).startswith("s3://"):
        try:
            m = s3_version_manifest(str(store))
        except SarflowError:
            raise
        except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types for one outage
            from sarflow.data.storage import s3_settings

            raise StorageError(str(store), f"the S3 endpoint {s3_settings().endpoint_url} failed while versioning the "
                                           f"store ({type(e).__name__}: {str(e)[:300]}); nothing was written (the "
                                           f"manifest beside it is as it was); rerun `sarflow version {store}` when "
                                           "the endpoint answers") from None
        return {"store": m["store"], "dvc_md5": m["version"], "git_commit": None, "catalog_hash": m["catalog_hash"],
                "chips": m["chips"], "repo": None, "pushed": False, "manifest": m["store"] + S3_MANIFEST_SUFFIX}
    store = Path(store).resolve()
    chips = open_store(store)
    root = Path(repo).resolve() if repo else (find_repo(store.parent) or store.parent)
    if remote and remote.startswith("s3://"):  # before anything is written: an unreachable remote leaves nothing
        from sarflow.data.storage import ensure_bucket, split_s3

        try:
            ensure_bucket(split_s3(remote)[0])
        except StorageError as e:
            raise StorageError(e.where, f"{e.cause}; nothing was tracked or pushed; rerun `sarflow version {store} "
                                        f"--remote {remote}` when the endpoint answers") from None
    init_repo(root)
    if remote:
        configure_remote(root, remote)
    # not -q: quiet `dvc add` prints no error either, and the stage-output case is told by its message
    added = dvc(["add", os.path.relpath(store, root)], cwd=root, check=False)
    if added.returncode != 0:
        text = added.stderr + added.stdout
        if "dvc.yaml" not in text:  # an output of a dvc.yaml stage is tracked by `dvc repro` instead
            raise SarflowError(f"dvc add {store} failed: {dvc_error(added)[-400:]}")
    digest = store_hash(root, store)
    pushed = False
    has_remote = bool(dvc(["remote", "list"], cwd=root).stdout.strip())
    if push and has_remote:
        proc = dvc(["push"], cwd=root, check=False)  # not -q: quiet DVC prints its support banner, not the error
        if proc.returncode != 0:
            listed = dvc(["remote", "list"], cwd=root).stdout.split()  # NAME URL per line; the default first
            url = remote or (listed[1] if len(listed) > 1 else "the DVC remote")
            raise StorageError(url, f"dvc push to {remote_endpoint(url)} failed: {dvc_error(proc)[-400:]}; the store is "
                                    f"tracked (DVC md5 {digest}, in {root}) but not pushed, the remote may hold part "
                                    f"of it; rerun `sarflow version {store}` (or `dvc push` in {root}) when the "
                                    "remote answers")
        pushed = True
    return {
        "store": str(store),
        "dvc_md5": digest,
        "git_commit": git_commit(root),
        "catalog_hash": chips.attrs["catalog_hash"],
        "chips": chips.n_chips,
        "repo": str(root),
        "pushed": pushed,
    }

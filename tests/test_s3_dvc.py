"""Integration tests against a real S3-compatible server (moto in server mode on 127.0.0.1)
and real DVC: tiling from s3:// sources, clear errors for bad S3 inputs (library and CLI),
a DVC push/pull round trip through an S3 remote, and `dvc repro` of the project's pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from sarflow.data.catalog import load_catalog
from sarflow.errors import InputError
from sarflow.data.chipstore import CHIPS_TABLE
from sarflow.data.tile import TileOptions, tile
from servers import free_port as _free_port
from servers import start_moto as _start_moto
from servers import stop as _stop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SARFLOW = str(VENV_BIN / "sarflow")
PREFIX = "scene"


# ---------------------------------------------------------------- servers

def _set_s3_env(monkeypatch, url: str, key: str = "testing", secret: str = "testing") -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.delenv("SARFLOW_S3_ENDPOINT", raising=False)  # it would win over AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def s3(moto_url, monkeypatch) -> str:
    """The S3 environment of the code under test, pointing at the moto server."""
    _set_s3_env(monkeypatch, moto_url)
    return moto_url


def _bucket() -> str:
    return f"sarflow-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- data

@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A tiny synthetic scene (192 px, 32 px chips); returns its catalog."""
    from sarflow.data.synth import SynthConfig, synthesize

    return synthesize(tmp_path_factory.mktemp("s3scene"), SynthConfig(size_px=192, chip_size=32, seed=3))


@pytest.fixture(scope="module")
def local_store(scene, tmp_path_factory) -> Path:
    """The store tiled from the local files: the reference."""
    return tile(load_catalog(scene), tmp_path_factory.mktemp("local") / "chips.zarr", TileOptions(),
                show_progress=False)


def _map_uris(uris, fn):
    return [_map_uris(u, fn) if isinstance(u, list) else fn(u) for u in uris]


def _upload_scene(catalog: Path, bucket: str) -> None:
    from sarflow.data.storage import ensure_bucket, upload_file

    ensure_bucket(bucket)
    for f in sorted(catalog.parent.iterdir()):
        if f.is_file():
            upload_file(f, f"s3://{bucket}/{PREFIX}/{f.name}")


def _s3_catalog(catalog: Path, dest: Path, uri_of) -> Path:
    """The catalog with every source URI rewritten by `uri_of` (nested lists kept)."""
    data = yaml.safe_load(catalog.read_text())
    for src in data["sources"]:
        src["uris"] = _map_uris(src["uris"], uri_of)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def _assert_same_arrays(a: Path, b: Path) -> list[str]:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names_a = sorted(k for k, _ in ga.arrays())
    assert names_a == sorted(k for k, _ in gb.arrays())
    assert names_a, f"{a} holds no array"
    for name in names_a:
        xa, xb = ga[name][...], gb[name][...]
        assert xa.dtype == xb.dtype, name
        np.testing.assert_array_equal(xa, xb, err_msg=name)  # NaNs compare equal
    return names_a


# ---------------------------------------------------------------- 1. tiling from s3://

def test_tile_from_s3_matches_local(s3, scene, local_store, tmp_path):
    from sarflow.data.storage import sha256_of

    bucket = _bucket()
    _upload_scene(scene, bucket)
    cat = _s3_catalog(scene, tmp_path / "s3cat" / "catalog.yaml", lambda u: f"s3://{bucket}/{PREFIX}/{u}")
    raw = yaml.safe_load(cat.read_text())
    orig = yaml.safe_load(scene.read_text())
    assert all(u.startswith("s3://") for s in raw["sources"] for u in _flat(s["uris"]))
    assert [_map_uris(s["uris"], lambda u: u.rsplit("/", 1)[1]) for s in raw["sources"]] == [
        s["uris"] for s in orig["sources"]]  # same files, same (nested) structure

    out = tile(load_catalog(cat), tmp_path / "s3.zarr", TileOptions(), show_progress=False)

    names = _assert_same_arrays(local_store, out)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["chips"] == zarr.open_group(str(local_store), mode="r").attrs["chips"] > 0
    scene_dir = scene.parent
    assert set(g.attrs["modalities"]) < set(names)  # beside them: the georeference arrays (spatial_ref, chip_x, chip_y)
    for name in g.attrs["modalities"]:
        sources = g[name].attrs["sources"]
        assert sources, name
        for entry in sources:
            uri = entry["uri"]
            assert uri.startswith(f"s3://{bucket}/{PREFIX}/"), uri
            local_file = scene_dir / uri.rsplit("/", 1)[1]
            assert entry["sha256"] == sha256_of(str(local_file)), uri
            assert entry["size"] == local_file.stat().st_size, uri
    import geopandas as gpd

    a, b = gpd.read_parquet(local_store / CHIPS_TABLE), gpd.read_parquet(out / CHIPS_TABLE)
    assert a["chip_id"].tolist() == b["chip_id"].tolist()
    assert a["split"].tolist() == b["split"].tolist()


def _flat(uris):
    for u in uris:
        yield from (_flat(u) if isinstance(u, list) else [u])


# ---------------------------------------------------------------- 2. bad S3 inputs

def _one_source_catalog(path: Path, uri: str) -> Path:
    """A catalog with one S3 source (the land cover), enough to exercise the input checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "grid": {"crs": "utm", "resolution": 10, "chip_size": 32},
        "sources": [{"name": "worldcover", "uris": [uri], "bands": ["class"], "units": "class",
                     "kind": "categorical", "nodata": 0, "legend": "worldcover"}],
    }, sort_keys=False))
    return path


def _assert_refused(tmp_path: Path, uri: str, causes: list[str]) -> InputError:
    """Both the library and the CLI refuse the catalog, naming the URI and the cause, and leave
    neither a store nor a .partial folder behind."""
    cat = _one_source_catalog(tmp_path / "bad" / "catalog.yaml", uri)
    out = tmp_path / "bad.zarr"
    t0 = time.monotonic()
    with pytest.raises(InputError) as info:
        tile(load_catalog(cat), out, TileOptions(), show_progress=False)
    assert time.monotonic() - t0 < 30, "the failure took too long"
    err = info.value
    msg = str(err)
    assert err.where == uri, msg
    assert uri in msg
    for cause in causes:
        assert cause in msg, msg
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()

    out_cli = tmp_path / "bad_cli.zarr"
    proc = subprocess.run([SARFLOW, "tile", str(cat), "--out", str(out_cli)], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert uri in proc.stderr, proc.stderr
    for cause in causes:
        assert cause in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out_cli.exists()
    assert not out_cli.with_name(out_cli.name + ".partial").exists()
    return err


def test_unreachable_endpoint(monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    _set_s3_env(monkeypatch, url)
    uri = "s3://sarflow-nowhere/scene/worldcover.tif"
    _assert_refused(tmp_path, uri, [url, "unreachable"])


def test_missing_bucket(s3, tmp_path):
    bucket = _bucket()  # never created
    uri = f"s3://{bucket}/{PREFIX}/worldcover.tif"
    _assert_refused(tmp_path, uri, [f"bucket {bucket!r} does not exist", s3])


def test_missing_object(s3, scene, tmp_path):
    from sarflow.data.storage import ensure_bucket, upload_file

    bucket = _bucket()
    ensure_bucket(bucket)
    upload_file(scene.parent / "worldcover.tif", f"s3://{bucket}/{PREFIX}/worldcover.tif")
    uri = f"s3://{bucket}/{PREFIX}/no_such_file.tif"
    err = _assert_refused(tmp_path, uri, ["object does not exist", s3])
    assert "bucket" not in err.cause


@pytest.fixture(scope="module")
def auth_moto(tmp_path_factory, scene):
    """A second moto server that enforces IAM authentication after its first 3 actions: those
    (unauthenticated) create a user, its access key and an inline policy allowing s3:*; the
    bucket and the object are then created with that key, already under authentication."""
    import boto3

    from sarflow.data.storage import S3Settings, ensure_bucket, upload_file

    n_setup_actions = 3
    proc, url = _start_moto(tmp_path_factory.mktemp("moto_auth") / "moto.log",
                            {"INITIAL_NO_AUTH_ACTION_COUNT": str(n_setup_actions)})
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="sarflow")  # 1
        key = iam.create_access_key(UserName="sarflow")["AccessKey"]  # 2
        iam.put_user_policy(UserName="sarflow", PolicyName="s3-all", PolicyDocument=json.dumps({  # 3
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        good = S3Settings(endpoint_url=url, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"],
                          region="us-east-1")
        bucket = _bucket()
        ensure_bucket(bucket, good)
        uri = f"s3://{bucket}/{PREFIX}/worldcover.tif"
        upload_file(scene.parent / "worldcover.tif", uri, good)
        yield {"url": url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "uri": uri,
               "size": (scene.parent / "worldcover.tif").stat().st_size}
    finally:
        _stop(proc)


def test_wrong_credentials(auth_moto, monkeypatch, tmp_path):
    from sarflow.errors import StorageError
    from sarflow.data.storage import check_s3_object

    url, uri = auth_moto["url"], auth_moto["uri"]
    # sanity: the right key is accepted now that authentication is enforced, by the stat and
    # by GDAL's signed /vsis3/ reads while tiling
    _set_s3_env(monkeypatch, url, auth_moto["key"], auth_moto["secret"])
    size, stamp = check_s3_object(uri)
    assert size == auth_moto["size"] and stamp.startswith("etag:")
    cat = _one_source_catalog(tmp_path / "good" / "catalog.yaml", uri)
    good = tile(load_catalog(cat), tmp_path / "good.zarr", TileOptions(), show_progress=False)
    g = zarr.open_group(str(good), mode="r")
    assert g.attrs["chips"] > 0
    assert [s["uri"] for s in g["worldcover"].attrs["sources"]] == [uri]

    # the right key id with a wrong secret: the signature does not match
    _set_s3_env(monkeypatch, url, auth_moto["key"], "not-the-secret-" + auth_moto["secret"][:8])
    err = _assert_refused(tmp_path / "wrong_secret", uri, ["refused the credentials", url])
    assert isinstance(err, StorageError)

    # an access key the server does not know at all
    _set_s3_env(monkeypatch, url, "AKIAUNKNOWNUNKNOWN00", "whatever")
    with pytest.raises(StorageError, match="refused the credentials") as info:
        check_s3_object(uri)
    assert info.value.where == uri


# ---------------------------------------------------------------- 3. DVC round trip through S3

def test_dvc_push_pull_roundtrip(s3, local_store, tmp_path):
    import geopandas as gpd
    from geopandas.testing import assert_geodataframe_equal

    from sarflow.data.storage import minio_client
    from sarflow.data.versioning import dvc, version_store

    repo = tmp_path / "repo"
    repo.mkdir()
    store = repo / "chips.zarr"
    shutil.copytree(local_store, store)
    bucket = _bucket()

    version = version_store(store, remote=f"s3://{bucket}/dvc", repo=repo)

    assert version["pushed"] is True
    md5 = version["dvc_md5"]
    assert md5.endswith(".dir"), md5
    assert (repo / ".dvc").is_dir() and (repo / "chips.zarr.dvc").is_file()
    keys = [o.object_name for o in minio_client().list_objects(bucket, prefix="dvc/", recursive=True)]
    n_files = sum(1 for p in store.rglob("*") if p.is_file())
    assert len(keys) >= n_files + 1, (len(keys), n_files)  # every file plus the .dir listing
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys

    shutil.rmtree(store)
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(["pull", "-q"], cwd=repo)

    assert store.is_dir()
    _assert_same_arrays(local_store, store)
    assert dict(zarr.open_group(str(store), mode="r").attrs) == dict(zarr.open_group(str(local_store), mode="r").attrs)
    a, b = gpd.read_parquet(local_store / CHIPS_TABLE), gpd.read_parquet(store / CHIPS_TABLE)
    assert_geodataframe_equal(a, b)
    assert a.geometry.geom_equals_exact(b.geometry, tolerance=0).all()
    assert (store / "manifest.json").read_bytes() == (local_store / "manifest.json").read_bytes()


# ---------------------------------------------------------------- 4. dvc repro of the project pipeline

def test_dvc_repro_pipeline(tmp_path, monkeypatch):
    from sarflow.data.chipstore import open_store
    from sarflow.data.versioning import dvc, version_store

    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # the stages run `sarflow`
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(size_px=128, chip_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc(["init", "--no-scm", "-q"], cwd=tmp_path)
    dvc(["repro", "-q"], cwd=tmp_path)

    chips_path = tmp_path / "data" / "chips.zarr"
    assert chips_path.is_dir()
    store = open_store(chips_path)
    assert store.n_chips > 0
    assert store.attrs["chip_size"] == 32
    assert len(store.chips) == store.n_chips

    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["tile"]["outs"]}
    md5 = outs["data/chips.zarr"]["md5"]
    assert md5.endswith(".dir"), md5
    assert lock["stages"]["synth"]["params"]["params.yaml"]["synth"]["size_px"] == 128

    version = version_store(chips_path, repo=tmp_path, push=False)
    assert version["dvc_md5"] == md5
    assert version["pushed"] is False
    assert version["chips"] == store.n_chips

    status = dvc(["status", "-q"], cwd=tmp_path, check=False)
    assert status.returncode == 0, status.stdout + status.stderr  # the pipeline is up to date

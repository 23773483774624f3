"""A real catalog it has never seen, tiled as on a cluster: Sen1Floods11's Spain chip (S1 dB in
EPSG:4326 with NaN nodata, S2 int16 with nodata 0, a water label with nodata -1) read from S3 (moto on
127.0.0.1), its checksums, screening and units each cut over separate processes, into one store on S3.
The store is the same bytes as `sarflow tile` of the same catalog in one process, and its lineage
holds hashlib's SHA-256 of every input object."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import folder_bytes, use_moto

SARFLOW = str(Path(sys.executable).with_name("sarflow"))
FLAGS = ["--shard-chips", "4", "--unit-shards", "1", "--workers", "1"]
INPUTS = {"s1": "Spain_7370579_S1Hand.tif", "s2": "Spain_7370579_S2Hand.tif", "water": "Spain_7370579_LabelHand.tif"}


@pytest.fixture()
def spain_on_s3(real_data, moto_url, monkeypatch, tmp_path):
    from sarflow.data.storage import ensure_bucket, s3_filesystem

    env = use_moto(monkeypatch, moto_url)
    ensure_bucket("eo-inputs")
    fs = s3_filesystem()
    d = real_data / "sen1floods11"
    for name in INPUTS.values():
        fs.put_file(str(d / name), f"eo-inputs/sen1floods11/spain/{name}")
    uri = {k: f"s3://eo-inputs/sen1floods11/spain/{v}" for k, v in INPUTS.items()}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "grid": {"crs": "utm", "resolution": 10, "chip_size": 32},
        "sources": [
            {"name": "s1", "uris": [uri["s1"]], "bands": ["VV", "VH"], "units": "dB", "kind": "continuous"},
            {"name": "s2", "uris": [uri["s2"]], "bands": [f"B{i}" for i in range(1, 14)], "units": "reflectance",
             "kind": "continuous", "nodata": 0},
            {"name": "water", "uris": [uri["water"]], "bands": ["water"], "units": "class", "kind": "categorical",
             "nodata": -1, "classes": {0: "dry", 1: "water"}},
        ]}, sort_keys=False))
    ensure_bucket("chips")
    return catalog, env, {uri[k]: d / v for k, v in INPUTS.items()}


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([SARFLOW, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _s3_files(uri: str) -> dict[str, bytes]:
    from sarflow.data.storage import s3_filesystem

    fs = s3_filesystem()
    prefix = uri[len("s3://"):]
    return {k[len(prefix) + 1:]: fs.cat_file(k) for k in sorted(fs.find(prefix))}


@pytest.mark.slow
def test_spain_from_s3_cut_over_processes_into_s3_equals_one_process(spain_on_s3, tmp_path):
    catalog, env, local_of = spain_on_s3
    reference = tmp_path / "reference.zarr"
    _run(["tile", str(catalog), "--out", str(reference), *FLAGS, "--quiet"], env)

    uri = "s3://chips/spain.zarr"
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hashed = _wait([subprocess.Popen([SARFLOW, "tile-checksum", str(catalog), "--out", uri, "--parts", "2",
                                      "--part", str(i)], **popen) for i in range(2)])
    assert sorted(json.loads(h)["hashed"] for h in hashed) == [1, 2]  # 3 objects, cut by bytes: S2 alone
    survey = _run(["tile-plan", str(catalog), "--out", uri, "--survey", "2", *FLAGS], env)
    assert "checksums: 0 of 3 input files hashed" in survey.stderr
    _wait([subprocess.Popen([SARFLOW, "tile-screen", uri, "--part", str(i)], **popen) for i in range(2)])
    units = json.loads(_run(["tile-plan", "--out", uri], env).stdout)["units"]
    assert units >= 4  # several units per run
    _wait([subprocess.Popen([SARFLOW, "tile-unit", uri, "--runs", "2", "--run", str(i)], **popen) for i in range(2)])
    _run(["tile-finalize", uri], env)

    got, want = _s3_files(uri), folder_bytes(reference)
    assert sorted(got) == sorted(want)
    for key in want:  # every shard, chips.parquet, statistics and attributes, the manifest
        assert got[key] == want[key], key
    manifest = json.loads(got["manifest.json"])
    lineage = {f["uri"]: f["sha256"] for s in manifest["sources"] for f in s["files"]}
    assert lineage == {u: hashlib.sha256(p.read_bytes()).hexdigest() for u, p in local_of.items()}

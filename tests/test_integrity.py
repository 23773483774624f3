"""Issue 16: a store proves its integrity. A missing shard read as all-NaN chips with exit 0; a
truncated shard, a truncated zarr.json or a deleted chips.parquet gave tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sarflow.cli.main import app
from sarflow.data import integrity
from sarflow.data.chipstore import open_chip_group, open_store, read_chip_table
from sarflow.errors import InputError


@pytest.fixture
def store(tiny_store, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(tiny_store, out)
    return out  # the tiler's finalize wrote its integrity record


def _shard(store, array: str, index: int):
    return store / array / "c" / str(index) / "0" / "0" / "0"


def test_an_intact_store_verifies_fast_and_full(store):
    doc = json.loads((store / integrity.INTEGRITY).read_text())
    assert "chips.parquet" in doc["files"] and any(k.startswith("s1grd/c/") for k in doc["files"])
    assert integrity.verify(store) == [] and integrity.verify(store, full=True) == []
    r = CliRunner().invoke(app, ["verify", str(store), "--full"])
    assert r.exit_code == 0 and "intact" in r.output, r.output
    assert "recorded files present" in json.loads(CliRunner().invoke(app, ["info", str(store), "--json"]).output)["integrity"]
    table = CliRunner().invoke(app, ["info", str(store)]).output  # the readable form
    assert "  integrity: recorded files present" in table and "\n  s1grd " in table


def test_a_missing_shard_is_refused_by_every_reader_naming_the_chips(store):
    per = json.loads((store / "s1grd" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"][0]
    _shard(store, "s1grd", 1).unlink()
    with pytest.raises(InputError, match=rf"s1grd/c/1/0/0/0 \(array s1grd, chips {per}\.\.{2 * per - 1}\): missing"):
        open_chip_group(str(store))
    with pytest.raises(InputError, match="the store is damaged"):
        open_store(store)
    r = CliRunner().invoke(app, ["verify", str(store)])
    assert r.exit_code == 1 and "damaged: s1grd/c/1/0/0/0" in r.output
    r = CliRunner().invoke(app, ["embed", str(store), "--model", "runs:/x/encoder", "--features-root", str(store.parent / "f"),
                                 "--tracking-uri", f"sqlite:///{store.parent / 'mlflow.db'}"])
    assert r.exit_code != 0 and "s1grd/c/1/0/0/0" in r.output


def test_a_truncated_shard_and_a_flipped_byte_are_found(store):
    shard = _shard(store, "s1grd", 0)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or rewritten"):
        open_chip_group(str(store))
    shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # same size, other content
    open_chip_group(str(store))  # the readers' fast check: sizes
    problems = integrity.verify(store, full=True)
    assert [(p.path, p.cause) for p in problems] == [("s1grd/c/0/0/0/0", "content differs from the recorded SHA-256")]


def test_damaged_metadata_and_a_missing_chip_table_get_messages(store):
    (store / "chips.parquet").unlink()
    with pytest.raises(InputError, match="chips.parquet"):
        read_chip_table(str(store))
    meta = store / "s1grd" / "zarr.json"
    text = meta.read_text()
    (store / "zarr.json").write_text((store / "zarr.json").read_text()[:40])
    with pytest.raises(InputError, match="the store's metadata cannot be read"):
        open_chip_group(str(store))
    assert text


def test_a_store_without_a_record_opens_and_verify_says_how_to_record(store):
    (store / integrity.INTEGRITY).unlink()
    open_chip_group(str(store))
    r = CliRunner().invoke(app, ["verify", str(store)])
    assert r.exit_code == 2 and "--record" in r.output
    r = CliRunner().invoke(app, ["verify", str(store), "--record"])
    assert r.exit_code == 0 and "intact" in r.output


def test_a_store_on_s3_is_recorded_and_checked(store, moto_url, monkeypatch):
    from sarflow.data.paths import filesystem
    from sarflow.data.storage import ensure_bucket

    for k, v in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    ensure_bucket("integrity")
    fs = filesystem()
    fs.put(str(store), "integrity/c.zarr", recursive=True)
    uri = "s3://integrity/c.zarr"
    assert integrity.verify(uri, full=True) == []
    open_chip_group(uri)
    fs.rm("integrity/c.zarr/s1grd/c/0/0/0/0")
    reader = subprocess.run([sys.executable, "-c", f"from sarflow.data.chipstore import open_chip_group; open_chip_group({uri!r})"],
                            capture_output=True, text=True)  # the next reader (this process verified it once)
    assert reader.returncode != 0 and "s1grd/c/0/0/0/0 (array s1grd, chips 0..15): missing" in reader.stderr, reader.stderr

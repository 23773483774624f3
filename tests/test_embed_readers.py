"""Issue 14 item 7: embed_store's chip reader in processes (`embed.readers`, `sarflow embed
--readers`). Reader processes open the store themselves (local or s3://), hand batches over in
chip order, so the embeddings Parquet equals the in-process run's row for row, and a reader's
error is the error the in-process reader raises, not a hang or a wrapped traceback."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from typer.testing import CliRunner

from sarflow.cli.main import app
from sarflow.data.chipstore import open_chip_group
from sarflow.errors import InputError
from sarflow.features.embed import EmbedConfig, _chip_batches, embed_store, partition, resolve_model

MODEL = "sarflow-encoder-mae"


@pytest.fixture(scope="module")
def encoded(tiny_store, tmp_path_factory):
    """A copy of the tiny store and a registered tiny MAE (2 steps); MLflow left pointing at it."""
    import mlflow

    from helpers import tiny_encoder

    tmp = tmp_path_factory.mktemp("readers")
    encoded = tiny_encoder(tiny_store, tmp)
    mlflow.set_tracking_uri(encoded["uri"])
    return {"store": encoded["store"], "tmp": tmp, "uri": encoded["uri"]}


def _rows(root) -> dict:
    ref = resolve_model(f"models:/{MODEL}/1")
    table = pq.read_table(partition(root, ref)).drop(["event_timestamp"])  # the time it ran, not what it wrote
    return table.to_pydict()


def test_reader_processes_write_the_same_parquet_as_the_in_process_reader(encoded):
    tmp = encoded["tmp"]
    one = embed_store(str(encoded["store"]), f"models:/{MODEL}/1", tmp / "r0", batch_size=10, readers=0)
    two = embed_store(str(encoded["store"]), f"models:/{MODEL}/1", tmp / "r2", batch_size=10, readers=2)
    assert (one["readers"], two["readers"], one["rows"]) == (0, 2, two["rows"])
    a, b = _rows(tmp / "r0"), _rows(tmp / "r2")
    assert a.keys() == b.keys() and len(a["chip_id"]) == int(zarr.open_group(str(encoded["store"]))["s1grd"].shape[0])
    for column in a:  # row for row, value for value (same chips in the same order through the same encoder)
        assert a[column] == b[column], column


def test_readers_come_from_params_and_the_cli(encoded, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("embed:\n  readers: -1\n")
    r = CliRunner().invoke(app, ["embed", str(encoded["store"]), "--model", f"models:/{MODEL}/1", "--features-root",
                                 str(tmp_path / "f"), "--tracking-uri", encoded["uri"], "--params", str(params)])
    assert r.exit_code == 2 and "embed.readers: Input should be greater than or equal to 0" in r.output and str(params) in r.output, r.output
    r = CliRunner().invoke(app, ["embed", str(encoded["store"]), "--model", f"models:/{MODEL}/1", "--features-root",
                                 str(tmp_path / "f"), "--tracking-uri", encoded["uri"], "--params", str(params),
                                 "--readers", "2", "--batch-size", "50"])
    assert r.exit_code == 0 and '"readers": 2' in r.output, r.output
    assert EmbedConfig().readers == 0  # the default reads in this process, as before


def _arrays(store) -> list:
    group = zarr.open_group(str(store), mode="r")
    return [(group["s1grd"], [1, 0]), (group["dem"], [0])]


def test_reader_processes_yield_the_in_process_batches_in_order(encoded):
    arrays, store = _arrays(encoded["store"]), str(encoded["store"])
    n = arrays[0][0].shape[0]
    want = torch.cat(list(_chip_batches(arrays, n, 7)))
    assert want.shape[1] == 3 and np.isnan(want.numpy()).any()  # the one reader's nodata is NaN in both
    for start in (0, 16):  # a shard range's rows too
        got = list(_chip_batches(arrays, n, 7, readers=2, store=store, start=start))
        assert [len(x) for x in got] == [min(7, n - s) for s in range(start, n, 7)]
        assert np.array_equal(torch.cat(got).numpy(), want[start:].numpy(), equal_nan=True)


def _damaged(encoded, tmp_path):
    store = tmp_path / "c.zarr"
    shutil.copytree(encoded["store"], store)
    return store, _arrays(store), store / "s1grd" / "c" / "1" / "0" / "0" / "0"


def test_a_shard_gone_after_opening_is_the_integrity_error_from_the_readers(encoded, tmp_path):
    store, arrays, shard = _damaged(encoded, tmp_path)
    shard.unlink()  # after the parent opened the store: each reader process opens it again
    with pytest.raises(InputError) as in_process:
        open_chip_group(str(store))
    with pytest.raises(InputError) as readers:
        list(_chip_batches(arrays, arrays[0][0].shape[0], 8, readers=2, store=str(store)))
    assert str(readers.value) == str(in_process.value) and "s1grd/c/1/0/0/0" in str(readers.value)
    assert readers.value.where == str(store) and "\n" not in str(readers.value)


def test_a_truncated_shard_without_a_record_raises_the_same_error_in_processes(encoded, tmp_path):
    store, arrays, shard = _damaged(encoded, tmp_path)
    (store / "integrity.json").unlink()  # no record: the damage is found while decoding
    shard.write_bytes(shard.read_bytes()[:200])
    errors = []
    for readers in (0, 2):
        with pytest.raises(Exception) as e:
            list(_chip_batches(arrays, arrays[0][0].shape[0], 8, readers=readers, store=str(store)))
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1], errors


@pytest.mark.integration
def test_reader_processes_open_an_s3_store_themselves(encoded, moto_url, monkeypatch):
    from sarflow.data.paths import filesystem
    from sarflow.data.storage import ensure_bucket

    for k, v in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # after the reader server may have started: the readers take the caller's environment
    ensure_bucket("readers")
    filesystem().put(str(encoded["store"]), "readers/c.zarr", recursive=True)
    uri = "s3://readers/c.zarr"
    group = open_chip_group(uri)
    arrays = [(group["s1grd"], [1, 0]), (group["dem"], [0])]
    n = arrays[0][0].shape[0]
    want = torch.cat(list(_chip_batches(_arrays(encoded["store"]), n, 16)))
    got = torch.cat(list(_chip_batches(arrays, n, 16, readers=2, store=uri)))
    assert np.array_equal(got.numpy(), want.numpy(), equal_nan=True)

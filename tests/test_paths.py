"""Paths (issue 12, item 9): every path a user passes is resolved against the working directory
once, at the door (a `sarflow` command or a Kubeflow component), and stored absolute (or kept
as s3://), so what one command records still names the same place for a command run later
from another folder.

Real commands run from a temporary working directory with relative paths: synth, tile, info,
version (a relative DVC remote), pretrain (relative --params and SQLite tracking file), embed
(the features root from a relative params value), features materialize and the embed /
materialize components with relative string parameters; plus the helper itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.paths import absolute, absolute_like, absolute_uri

# the smallest synthetic scene the chain takes: 128 px, 32 px chips (16 chips)
SIZE, CHIP = 128, 32
PARAMS = """\
pretrain:
  batch_size: 4
  vit: {size: tiny, patch: 8, depth: 1, dim: 32, heads: 2}
  optim: {max_steps: 2, warmup_steps: 1}
  methods:
    mae: {decoder_dim: 32, decoder_depth: 1}
features:
  root: feats
"""


def _sarflow(args: list[str]):
    from sarflow.cli.main import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, f"sarflow {' '.join(args)}:\n{result.output}"
    return result


def _json(result) -> dict:
    """The JSON document a command printed (after any log lines)."""
    text = result.stdout
    return json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)


# ---------------------------------------------------------------- the helper

def test_absolute_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("data/features") == str(tmp_path.resolve() / "data" / "features")
    assert absolute("./a/../b") == str(tmp_path.resolve() / "b")
    assert absolute(Path("chips.zarr")) == str(tmp_path.resolve() / "chips.zarr")
    assert absolute("/already/absolute") == "/already/absolute"


def test_absolute_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute("~/chips.zarr") == str(tmp_path.resolve() / "chips.zarr")


def test_urls_and_nothing_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://bucket/prefix", "s3://bucket/a/../b", "gs://b/x", "http://127.0.0.1:9000/x"):
        assert absolute(uri) == uri
    assert absolute(None) is None and absolute("") == ""


def test_absolute_like_keeps_the_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert absolute_like(Path("x")) == here / "x" and isinstance(absolute_like(Path("x")), Path)
    assert absolute_like("x") == str(here / "x")
    assert absolute_like(["a", "s3://b/c"]) == [str(here / "a"), "s3://b/c"]
    assert absolute_like(None) is None


def test_tracking_uri_sqlite_file_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert absolute_uri("sqlite:///runs/m.db?timeout=5") == f"sqlite:///{tmp_path.resolve() / 'runs' / 'm.db'}?timeout=5"
    for uri in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://127.0.0.1:5000", "databricks",
                "postgresql://u@h/db", "", None):
        assert absolute_uri(uri) == uri


def test_params_file_paths_are_absolute_when_a_command_reads_it(tmp_path, monkeypatch):
    from sarflow.cli.common import read_params, stage_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "p.yaml").write_text(
        "features: {root: data/features, repo: feast-repo}\n"
        "llp: {stats: stats.csv, out_dir: out/llp, tracking_uri: 'sqlite:///m.db'}\n"
        "downstream: {out_dir: s3://bucket/plots}\n")
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    p = read_params(Path("conf/p.yaml"))
    assert p["features"] == {"root": str(here / "data" / "features"), "repo": str(here / "feast-repo")}
    assert p["llp"] == {"stats": str(here / "stats.csv"), "out_dir": str(here / "out" / "llp"),
                        "tracking_uri": f"sqlite:///{here / 'm.db'}"}
    assert p["downstream"] == {"out_dir": "s3://bucket/plots"}
    cfg = stage_config("llp", p, store=absolute("chips.zarr"), polygons=absolute("bags.geojson"))
    assert cfg.stats == str(here / "stats.csv") and cfg.out_dir == str(here / "out" / "llp")
    # for a pipeline compiled or submitted to a cluster, the file's paths are the cluster's: left as written
    assert read_params(Path("conf/p.yaml"), resolve=False)["llp"]["out_dir"] == "out/llp"


def test_every_path_option_of_every_command_is_resolved_at_the_door():
    """No path-like parameter of a `sarflow` command escapes the helper (a new one would)."""
    import typer.main

    from sarflow.cli.common import absolute_path, absolute_tracking_uri
    from sarflow.cli.main import app

    pathlike = ("store", "root", "out", "catalog", "params", "polygons", "stats", "raster", "repo", "remote", "dir",
                "clear", "clouded", "synth", "other", "services", "real", "summary", "pipeline_root", "tracking_uri",
                "backend")
    not_paths = {"output_size"}
    missing = []

    def walk(group, prefix):
        for name, cmd in getattr(group, "commands", {}).items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix} {name}")
                continue
            for param in cmd.params:
                if param.name in not_paths or not any(k in param.name for k in pathlike):
                    continue
                if getattr(param.callback, "__wrapped__", None) not in (absolute_path, absolute_tracking_uri):
                    missing.append(f"sarflow{prefix} {name} --{param.name}")

    walk(typer.main.get_command(app), "")
    assert not missing, "path parameters not made absolute at the door: " + ", ".join(missing)


def test_pipeline_arguments_of_a_local_run_are_absolute(tmp_path, monkeypatch):
    from pipelines import load
    from sarflow.cli.pipeline import _arguments

    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    pairs = ["features_root=data/features", "dvc_remote=remote", "tracking_uri=sqlite:///mlflow.db"]
    args = _arguments(load("e2e"), None, pairs, local=True)
    assert args["features_root"] == str(here / "data" / "features") and args["dvc_remote"] == str(here / "remote")
    assert args["tracking_uri"] == f"sqlite:///{here / 'mlflow.db'}"
    # compiled / submitted: the cluster's paths, as given
    assert _arguments(load("e2e"), None, pairs)["features_root"] == "data/features"
    assert _arguments(load("e2e"), None, ["features_root=s3://sarflow-features"], local=True)["features_root"] \
        == "s3://sarflow-features"


# ---------------------------------------------------------------- real commands, relative paths

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The README's data-plane commands with relative paths, run in a fresh working directory:
    `sarflow synth scene`, `sarflow tile scene/catalog.yaml --out chips.zarr`."""
    work = tmp_path_factory.mktemp("work")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        synth = _sarflow(["synth", "scene", "--size", str(SIZE), "--chip-size", str(CHIP)])
        tile = _sarflow(["tile", "scene/catalog.yaml", "--out", "chips.zarr", "--shard-chips", "16", "--quiet"])
        (work / "conf").mkdir()
        (work / "conf" / "p.yaml").write_text(PARAMS)
    finally:
        os.chdir(cwd)
    work = work.resolve()
    assert f"scene written: {work / 'scene' / 'catalog.yaml'}" in synth.output
    assert f"chip store written: {work / 'chips.zarr'}" in tile.output
    return work


def test_synth_and_tile_write_where_the_user_stands(work):
    assert (work / "scene" / "catalog.yaml").is_file()
    assert (work / "chips.zarr" / "zarr.json").is_file() and (work / "chips.zarr" / "chips.parquet").is_file()


def test_info_from_another_folder(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = _json(_sarflow(["info", os.path.relpath(work / "chips.zarr", tmp_path), "--json"]))
    assert summary["path"] == str(work / "chips.zarr") and summary["chips"] > 0


@pytest.mark.slow
def test_version_pushes_to_a_relative_remote_of_the_working_directory(work, tmp_path, monkeypatch):
    """`sarflow version STORE --remote remote` from another folder pushes to ./remote there (DVC
    alone would take it relative to the data repository, the store's folder)."""
    import shutil

    store = tmp_path / "data" / "chips.zarr"
    shutil.copytree(work / "chips.zarr", store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = _json(_sarflow(["version", "../data/chips.zarr", "--remote", "remote"]))
    assert out["store"] == str(store.resolve()) and out["pushed"] is True
    assert (elsewhere / "remote").is_dir() and any((elsewhere / "remote").rglob("*"))
    assert not (tmp_path / "data" / "remote").exists()
    assert f"url = {(elsewhere / 'remote').resolve()}" in (tmp_path / "data" / ".dvc" / "config").read_text()


@pytest.mark.slow
def test_what_commands_record_is_absolute_and_found_from_elsewhere(work, tmp_path_factory, monkeypatch):
    """pretrain (relative --params, relative SQLite tracking file) -> embed (the features root a
    relative params value) -> from another folder: features materialize and the components."""
    import mlflow
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from components import embed_chips, materialize_features

    monkeypatch.chdir(work)
    track = ["--tracking-uri", "sqlite:///mlflow.db"]
    result = _json(_sarflow(["pretrain", "chips.zarr", "--params", "conf/p.yaml", *track]))
    assert (work / "mlflow.db").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["sarflow.store"] == str(work / "chips.zarr")  # the lineage names the store absolutely
    model = f"models:/{result['registered_model']}/{result['version']}"

    embedded = _json(_sarflow(["embed", "chips.zarr", "--model", model, "--params", "conf/p.yaml", *track]))
    assert embedded["partition"].startswith(str(work / "feats" / "embeddings"))
    _sarflow(["features", "labels", "chips.zarr", "--params", "conf/p.yaml"])
    assert (work / "feats" / "labels" / "labels.parquet").is_file()

    # a later command from another folder, with its own relative path to the same root
    other = tmp_path_factory.mktemp("other").resolve()
    monkeypatch.chdir(other)
    rel = os.path.relpath(work / "feats", other)
    report = _json(_sarflow(["features", "materialize", "--features-root", rel]))
    assert sum(int(v["rows"]) for v in report.values()) > 0
    feature_store = (work / "feats" / "feast" / "feature_store.yaml").read_text()
    assert f"path: {work / 'feats' / 'feast' / 'online.db'}" in feature_store
    assert not (other / "feats").exists() and not (other / "mlflow.db").exists()

    # the components take relative strings the same way (kfp.local runs tasks in the launcher's folder)
    monkeypatch.chdir(work)
    encoder = other / "encoder.json"
    encoder.write_text(json.dumps({"model_uri": model, "tracking_uri": "sqlite:///mlflow.db"}))
    descriptor = Dataset(name="embeddings", uri=str(other / "embed" / "embeddings"))
    embed_chips.python_func(store=Dataset(name="store", uri=str(work / "chips.zarr")),
                            encoder=Model(name="encoder", uri=str(encoder)), embeddings=descriptor,
                            metrics=Metrics(name="metrics", uri=str(other / "embed" / "metrics")),
                            features_root="feats-kfp", tracking_uri="sqlite:///mlflow.db")
    described = json.loads(Path(descriptor.path).read_text())
    assert described["features_root"] == str(work / "feats-kfp")
    assert described["partition"].startswith(str(work / "feats-kfp" / "embeddings"))
    features = Artifact(name="features", uri=str(other / "materialize" / "features"))
    materialize_features.python_func(embeddings=Dataset(name="embeddings", uri=descriptor.uri), features=features,
                                     metrics=Metrics(name="metrics", uri=str(other / "materialize" / "metrics")),
                                     features_root="feats-kfp")
    record = json.loads(Path(features.path).read_text())
    assert record["features_root"] == str(work / "feats-kfp")
    assert record["feast_repo"] == str(work / "feats-kfp" / "feast")

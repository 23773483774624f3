"""Bad inputs an operator may give: each is refused with a message naming the input and the
cause (an InputError, or a non-zero exit and one line from the CLI), never a traceback or a
silent success."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from sarflow.errors import InputError


# --- LLP statistics whose proportions are not proportions ------------------------------------

def _llp_cfg(tiny_scene, tiny_store, stats):
    from sarflow.downstream.llp.config import LLPConfig

    return LLPConfig(store=str(tiny_store), polygons=str(tiny_scene.parent / "municipalities.geojson"),
                     stats=str(stats), register=False)


@pytest.mark.parametrize("change, cause", [
    ("triple", r"do not sum to 1 .*\(sum 3\)"),
    ("negative", r"negative proportion.*frac_"),
    ("half", r"do not sum to 1 .*\(sum 0\.5\)"),
])
def test_llp_statistics_that_are_not_proportions_are_refused(tiny_scene, tiny_store, tmp_path, change, cause):
    from sarflow.downstream.llp.data import prepare_store_data

    stats = pd.read_csv(tiny_scene.parent / "municipality_stats.csv", dtype={"muni_id": str})
    fracs = [c for c in stats.columns if c.startswith("frac_")]
    bad_id = stats.muni_id.iloc[1]
    if change == "triple":
        stats.loc[1, fracs] = stats.loc[1, fracs] * 3
    elif change == "negative":
        stats.loc[1, fracs[0]] = -0.25
    else:
        stats.loc[1, fracs] = stats.loc[1, fracs] * 0.5
    path = tmp_path / f"{change}.csv"
    stats.to_csv(path, index=False)
    with pytest.raises(InputError, match=cause) as e:
        prepare_store_data(_llp_cfg(tiny_scene, tiny_store, path))
    assert e.value.where == str(path) and bad_id in e.value.cause


def test_llp_statistics_within_tolerance_or_empty_are_accepted(tmp_path):
    from sarflow.downstream.llp.data import check_proportions

    df = pd.DataFrame({"id": ["a", "b", "c"], "frac_0": [0.5, float("nan"), 0.0],
                       "frac_1": [0.505, float("nan"), 0.0]})
    check_proportions(df, "id", "s.csv")  # 1.005 is within the tolerance; empty rows are no bag
    with pytest.raises(InputError, match="a \\(sum 1.005\\)"):
        check_proportions(df, "id", "s.csv", tolerance=1e-3)


@pytest.mark.parametrize("change, cause", [
    ("unknown", r"2 of 6 id\(s\) in column 'muni_id' name no polygon of .*municipalities.geojson: \['X0001', 'X0003'\]"),
    ("twice", r"1 id\(s\) in column 'muni_id' have several rows: \['M0002'\]"),
])
def test_llp_statistics_of_unknown_municipalities_are_refused_and_nothing_is_written(tiny_scene, tiny_store, tmp_path,
                                                                                      change, cause):
    """Issue 16: statistics rows whose id names no polygon were silently ignored (and an id given
    twice made two proportions for one bag): exit 2 naming the file, the count and the ids; no
    MLflow run, no model, no bags or plots written."""
    stats = pd.read_csv(tiny_scene.parent / "municipality_stats.csv", dtype={"muni_id": str})
    if change == "unknown":
        stats = pd.concat([stats, stats.iloc[[0, 2]].assign(muni_id=["X0001", "X0003"])])  # trained on silently before
    else:
        stats = pd.concat([stats, stats.iloc[[1]]])
    path = tmp_path / f"{change}.csv"
    stats.to_csv(path, index=False)
    res = _sarflow("llp", "train", tiny_store, "--polygons", tiny_scene.parent / "municipalities.geojson",
                   "--stats", path, "--features-root", tmp_path / "features", "--out", tmp_path / "llp",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--steps", "2", "--no-register")
    assert res.exit_code == 2, res.output
    _refused(res, str(path))
    assert re.search(cause, " ".join(res.output.split())), res.output
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no mlflow.db, no mlruns, no features, no plots


def test_llp_polygons_without_statistics_are_left_out_with_a_count(tiny_scene, tiny_store, tmp_path, caplog):
    """A polygon with no statistics row has no proportions to learn from: not a bag, and the log says
    how many were left out."""
    from sarflow.downstream.llp.data import prepare_store_data

    stats = pd.read_csv(tiny_scene.parent / "municipality_stats.csv", dtype={"muni_id": str})
    dropped = stats.muni_id.iloc[3]
    path = tmp_path / "three.csv"
    stats.drop(index=3).to_csv(path, index=False)
    with caplog.at_level("WARNING", logger="sarflow.downstream.llp.data"):
        data, _ = prepare_store_data(_llp_cfg(tiny_scene, tiny_store, path))
    assert re.search(r"1 of 4 polygon\(s\) have no row in .*three.csv \(e\.g\. \['" + dropped + r"'\]\): not bags, left out",
                     caplog.text), caplog.text
    assert dropped not in set(data.bags.members.bag_id) and dropped not in data.bags.proportions.index
    assert set(data.bags.members.bag_id) == set(stats.muni_id) - {dropped}


# --- catalogs: coordinates, CRS and URIs ------------------------------------------------------

def _sarflow(*args):
    from typer.testing import CliRunner

    from sarflow.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(res, *needles):
    """A clean refusal: non-zero exit, the needles in the output, no traceback."""
    assert res.exit_code not in (0, None), res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, (needle, res.output)


def _catalog(tiny_scene, tmp_path, mutate):
    import yaml

    data = yaml.safe_load(tiny_scene.read_text())
    mutate(data)
    # the uris stay valid: they are resolved against the scene folder
    for s in data["sources"]:
        if "uris" in s:
            s["uris"] = [[str(tiny_scene.parent / x) for x in u] if isinstance(u, list) else str(tiny_scene.parent / u)
                         for u in s["uris"]]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("aoi, needle", [
    ([10.0, 45.0, 11.0, 95.0], "latitude 95 outside [-90, 90]"),
    ([-200.0, 45.0, 11.0, 46.0], "longitude -200 outside [-180, 180]"),
])
def test_bbox_aoi_out_of_range_is_refused(tiny_scene, tmp_path, aoi, needle):
    from sarflow.data.catalog import load_catalog
    from sarflow.errors import CatalogError

    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(aoi=aoi))
    with pytest.raises(CatalogError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
        load_catalog(path)
    assert e.value.where == str(path)
    _refused(_sarflow("ingest", path), str(path), needle)


@pytest.mark.parametrize("crs", [99999, "EPSG:99999", "not-a-crs"])
def test_invalid_epsg_code_is_refused_naming_the_catalog(tiny_scene, tmp_path, crs):
    from sarflow.data.catalog import load_catalog
    from sarflow.errors import CatalogError

    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(crs=crs))
    with pytest.raises(CatalogError, match="grid.crs") as e:
        load_catalog(path)
    assert e.value.where == str(path) and str(crs) in e.value.cause
    _refused(_sarflow("ingest", path), str(path), "grid.crs", str(crs), "not a known CRS")


def test_directory_as_uri_is_not_reported_missing(tiny_scene, tmp_path):
    folder = tmp_path / "a_folder.tif"
    folder.mkdir()

    def mutate(d):
        d["sources"][0]["uris"] = [str(folder)] + d["sources"][0]["uris"][1:]

    path = _catalog(tiny_scene, tmp_path, mutate)
    res = _sarflow("ingest", path)
    _refused(res, str(folder), "is a directory, not a raster file")
    assert "does not exist" not in res.output


# --- a grid too large to plan -----------------------------------------------------------------

def test_absurd_grid_is_refused_before_allocating(tiny_scene, tmp_path):
    import resource
    import time

    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(resolution=0.001))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    res = _sarflow("ingest", path)
    _refused(res, str(path), "chips", "resolution 0.001", "the limit is 50,000,000")
    out = tmp_path / "chips.zarr"
    _refused(_sarflow("tile", path, "--out", out), "resolution 0.001")
    assert time.monotonic() - start < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 * 1024 * 1024  # < 2 GiB more (KiB)
    assert not out.exists() and not list(tmp_path.glob("chips.zarr*"))


def test_grid_size_is_checked_by_the_grid_itself():
    import shapely
    from pyproj import CRS

    from sarflow.data.grid import ChipGrid

    grid = ChipGrid(crs=CRS.from_epsg(32632), resolution=0.01, chip_size=32, overlap=0, origin=(0.0, 0.0),
                    aoi=shapely.box(500_000, 5_000_000, 510_000, 5_010_000))
    assert grid.estimated_chips() > 9 * 10 ** 8  # (10 km / 0.32 m)^2
    with pytest.raises(InputError, match=r"about [\d,]+ chips \(resolution 0.01"):
        grid.candidates
    ok = ChipGrid(crs=CRS.from_epsg(32632), resolution=10, chip_size=32, overlap=0, origin=(0.0, 0.0),
                  aoi=shapely.box(500_000, 5_000_000, 510_000, 5_010_000))
    assert ok.size_problem() is None and 0 < len(ok.candidates) <= ok.estimated_chips()


# --- pretrain / embed on something that is not a finished store -------------------------------

def _not_stores(tmp_path):
    missing = tmp_path / "missing.zarr"
    unfinished = tmp_path / "unfinished.zarr"
    (tmp_path / "unfinished.zarr.partial").mkdir()
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    return [(missing, "the path does not exist"), (unfinished, "the store is unfinished (a .partial build exists)"),
            (empty, "not a chip store (no zarr.json)")]


def test_pretrain_and_embed_refuse_a_path_that_is_not_a_finished_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for store, cause in _not_stores(tmp_path):
        res = _sarflow("pretrain", store, "--max-steps", 1, "--tracking-uri", uri)
        _refused(res, str(store), cause)
        res = _sarflow("embed", store, "--model", "models:/nothing/1", "--features-root", tmp_path / "features",
                       "--tracking-uri", uri)
        _refused(res, str(store), cause)  # the store is checked before the model is looked up
        if "unfinished" in cause:
            assert f"sarflow tile CATALOG --out {store}" in res.output
    assert not (tmp_path / "features").exists()


def test_llp_on_an_unfinished_store_says_how_to_finish_it(tiny_scene, tmp_path):
    from sarflow.downstream.llp.data import prepare_store_data

    (tmp_path / "unfinished.zarr.partial").mkdir()
    store = tmp_path / "unfinished.zarr"
    with pytest.raises(InputError, match="unfinished .*sarflow tile CATALOG --out") as e:
        prepare_store_data(_llp_cfg(tiny_scene, store, tiny_scene.parent / "municipality_stats.csv"))
    assert e.value.where == str(store)


def _footprint84(tiny_scene) -> tuple[float, float, float, float]:
    import rasterio
    from rasterio.warp import transform_bounds

    import yaml

    data = yaml.safe_load(tiny_scene.read_text())
    first = data["sources"][0]["uris"][0]
    first = first[0] if isinstance(first, list) else first
    with rasterio.open(tiny_scene.parent / first) as ds:
        return transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)


def test_an_aoi_off_every_source_blames_the_aoi_not_a_raster(tiny_scene, tmp_path):
    """Issue 16: a bbox with lon/lat swapped (or a file in another CRS than it says) was reported as
    'source ... does not overlap the AOI' against the first raster."""
    w, s, e, n = _footprint84(tiny_scene)
    swapped = [s, w, n, e]  # latitudes where longitudes belong: still valid degrees, somewhere else
    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(aoi=swapped))
    _refused(_sarflow("ingest", path), str(path), "overlaps none of the sources", "check the AOI's CRS")


def test_an_aoi_file_without_a_crs_is_refused_naming_it(tiny_scene, tmp_path):
    import geopandas as gpd
    import shapely

    w, s, e, n = _footprint84(tiny_scene)  # a shapefile without .prj (GeoJSON is WGS84 by definition)
    gpd.GeoDataFrame(geometry=[shapely.box(w, s, e, n)]).to_file(tmp_path / "aoi.shp")
    (tmp_path / "aoi.prj").unlink(missing_ok=True)
    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(aoi=str(tmp_path / "aoi.shp")))
    _refused(_sarflow("ingest", path), "aoi.shp", "the AOI file has no CRS")


@pytest.mark.parametrize("command", ["tile", "synth"])
def test_an_output_folder_that_cannot_be_made_gets_a_line_not_a_traceback(tiny_scene, tmp_path, command):
    """Issue 16: an output folder that is not writable gave a traceback. (Tests run as root, which
    may write anywhere: a path under a regular file stands in for it.)"""
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    args = ["tile", str(tiny_scene), "--out", str(out)] if command == "tile" else ["synth", str(out), "--size", "128"]
    res = subprocess.run([sys.executable, "-m", "sarflow.cli.main", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and f"{blocker}" in res.stderr and "Not a directory" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_killed_embed_leaves_no_partial_folder_behind_the_next_run(tmp_path):
    """Issue 16: a killed `embed` left its `.partial-*` folder for good. The next write of a
    partition removes the ones whose writer (a pid of this machine) is gone, never a live one's."""
    import os
    import subprocess
    import sys

    from sarflow.features.embed import folder_replaced

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".partial-{gone.stdout.strip()}-abc"
    (dead / "sub").mkdir(parents=True)
    live = tmp_path / f".partial-{os.getppid()}-xyz"  # a writer still running
    live.mkdir()
    out = tmp_path / "version=1"
    with folder_replaced(out) as tmp:
        (tmp / "part-00000.parquet").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "version=1"])
    assert (out / "part-00000.parquet").read_bytes() == b"x"
    with pytest.raises(RuntimeError):
        with folder_replaced(out) as tmp:
            (tmp / "half").write_bytes(b"y")
            raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "version=1"])
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]


def test_a_partition_moved_aside_by_a_killed_overwrite_is_put_back_by_the_next_write(tmp_path):
    """Issue 16: `embed --overwrite` killed between moving the old partition aside and renaming the
    new one in left no partition, and the next write in the folder deleted the old copy too. The
    next write now puts the old partition back (the new one, never renamed, is recomputed by a rerun)."""
    import subprocess
    import sys

    from sarflow.features.embed import folder_replaced

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = gone.stdout.strip()
    old = tmp_path / f".partial-{pid}-old-abc" / "version=1"  # the state the kill left
    old.mkdir(parents=True)
    (old / "part-00000.parquet").write_bytes(b"old rows")
    (tmp_path / f".partial-{pid}-def").mkdir()  # the new partition, never renamed in
    with folder_replaced(tmp_path / "version=2") as tmp:  # the next write in the folder (another version)
        (tmp / "part-00000.parquet").write_bytes(b"v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version=1", "version=2"]
    assert (tmp_path / "version=1" / "part-00000.parquet").read_bytes() == b"old rows"


def test_a_failed_rename_of_a_new_partition_puts_the_old_one_back_at_once(tmp_path, monkeypatch):
    """The rename of the new partition fails (a fault injected into os.replace for that one call):
    the old partition, already moved aside, is back in place before the error reaches the caller."""
    import os
    from pathlib import Path

    from sarflow.features import embed

    out = tmp_path / "version=1"
    with embed.folder_replaced(out) as tmp:
        (tmp / "part-00000.parquet").write_bytes(b"old rows")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".partial-") and "-old-" not in Path(src).name:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(embed.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        with embed.folder_replaced(out) as tmp:
            (tmp / "part-00000.parquet").write_bytes(b"new rows")
    assert [p.name for p in tmp_path.iterdir()] == ["version=1"]
    assert (out / "part-00000.parquet").read_bytes() == b"old rows"


@pytest.mark.parametrize("command", ["ingest", "embed", "export", "tile"])
@pytest.mark.parametrize("blocked", ["under-a-file", "read-only"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tiny_scene, tmp_path, command, blocked):
    """Issue 16: ingest --out, embed --features-root, export --out and tile --out in a folder that cannot be
    written: one line naming the folder and the cause, exit 2, before any work, nothing created."""
    import os

    if blocked == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        cause = "Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        blocker = tmp_path / "read-only"
        blocker.mkdir()
        blocker.chmod(0o555)
        cause = "Permission denied"
    out = blocker / "out" / "deeper"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"ingest": ["ingest", tiny_scene, "--out", out / "manifest.json"],
            "embed": ["embed", tmp_path / "missing.zarr", "--model", "models:/nothing/1", "--features-root", out,
                      "--tracking-uri", uri],
            "export": ["export", tmp_path / "missing.zarr", "--modality", "any", "--out", out],
            "tile": ["tile", tiny_scene, "--out", out / "chips.zarr"]}[command]
    try:
        res = _sarflow(*args)
        _refused(res, "cannot write into the output folder", str(blocker), cause, "nothing was written", "rerun")
        assert res.exit_code == 2
        lines = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, res.output
        assert "missing.zarr" not in res.output  # refused before the store (any work) was looked at
        assert sorted(p.name for p in tmp_path.iterdir()) == [blocker.name]
        if blocked == "read-only":
            assert list(blocker.iterdir()) == []
    finally:
        if blocker.is_dir():
            blocker.chmod(0o755)


# --- an S3 outage while embedding to, or versioning into, an s3:// place -----------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
          "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@pytest.fixture
def own_moto(tmp_path, monkeypatch):
    """A moto S3 server of this test alone (the test stops it mid-way), the environment pointing at it."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from servers import start_moto, stop

    proc, url = start_moto(tmp_path / "moto.log")
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.delenv("SARFLOW_S3_ENDPOINT", raising=False)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    yield proc, url
    stop(proc)


def _error_line(res) -> str:
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def encoder(tiny_store, tmp_path_factory):
    """A registered tiny MAE (2 steps) on a copy of the tiny store; MLflow in a SQLite file."""
    from helpers import tiny_encoder

    encoded = tiny_encoder(tiny_store, tmp_path_factory.mktemp("outage"))
    return encoded["store"], encoded["uri"]


@pytest.mark.slow
def test_an_s3_outage_while_embedding_names_the_endpoint_and_publishes_nothing(encoder, own_moto, monkeypatch, tmp_path):
    """Issue 16: the S3 endpoint of an s3:// features root goes away after the chips were embedded,
    before they are written: one line (the partition, the endpoint, the cause, what is left, how to
    retry), exit 2, nothing published. Then the endpoint closed from the start: refused before any work."""
    import tempfile

    import sarflow.features.embed as embed_mod
    from sarflow.data.storage import ensure_bucket
    from servers import stop

    store, uri = encoder
    proc, url = own_moto
    ensure_bucket("outage")
    table = embed_mod._embedding_table

    def embedded_then_outage(*a, **k):
        stop(proc)  # the server goes away mid-run, between the forward passes and the upload
        return table(*a, **k)

    monkeypatch.setattr(embed_mod, "_embedding_table", embedded_then_outage)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local copy of the upload is staged
    root = "s3://outage/features"
    res = _sarflow("embed", store, "--model", "models:/sarflow-encoder-mae/1", "--root", root, "--tracking-uri", uri,
                   "--device", "cpu")
    line = _error_line(res)
    assert f"{root}/embeddings/model=sarflow-encoder-mae/version=1" in line, line
    for needle in (url, "failed", "not published", "rerun the same `sarflow embed` when the endpoint answers"):
        assert needle in line, (needle, line)
    assert "Traceback" not in res.output
    assert not list(tmp_path.glob("sarflow-*"))  # no local staging left

    monkeypatch.setattr(embed_mod, "_embedding_table", table)
    res = _sarflow("embed", store, "--model", "models:/sarflow-encoder-mae/1", "--root", root, "--tracking-uri", uri,
                   "--device", "cpu")  # the endpoint is closed now: refused before embedding
    line = _error_line(res)
    for needle in (root, url, "unreachable", "nothing was embedded or written", "rerun"):
        assert needle in line, (needle, line)


@pytest.mark.slow
def test_an_s3_outage_during_dvc_push_says_the_real_cause(tiny_store, own_moto, monkeypatch, tmp_path):
    """Issue 16: `sarflow version --remote s3://...` whose endpoint goes away before the push said
    only DVC's support banner. Now: the remote, the endpoint, DVC's error, what is left, how to retry.
    An endpoint closed from the start is refused before anything is tracked."""
    import shutil

    import sarflow.data.versioning as versioning
    from servers import free_port, stop

    proc, url = own_moto
    repo = tmp_path / "repo"
    repo.mkdir()
    store = repo / "chips.zarr"
    shutil.copytree(tiny_store, store)
    configure = versioning.configure_remote

    def configured_then_outage(*a, **k):
        configure(*a, **k)
        stop(proc)

    monkeypatch.setattr(versioning, "configure_remote", configured_then_outage)
    remote = "s3://outage/dvc"
    res = _sarflow("version", store, "--remote", remote, "--repo", repo)
    line = _error_line(res)
    for needle in (remote, url, "dvc push", "Could not connect to the endpoint URL", "not pushed",
                   f"rerun `sarflow version {store}`"):
        assert needle in line, (needle, line)
    assert "dvc.org/support" not in res.output and "Traceback" not in res.output

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    repo2 = tmp_path / "repo2"
    repo2.mkdir()
    store2 = repo2 / "chips.zarr"
    shutil.copytree(tiny_store, store2)
    res = _sarflow("version", store2, "--remote", remote, "--repo", repo2)
    line = _error_line(res)
    for needle in ("s3://outage", closed, "unreachable", "nothing was tracked or pushed", "rerun"):
        assert needle in line, (needle, line)
    assert sorted(p.name for p in repo2.iterdir()) == ["chips.zarr"]  # no .dvc, no chips.zarr.dvc


# --- an AOI file whose coordinates are in another CRS than it declares -------------------------

@pytest.mark.parametrize("case", ["metres-in-a-geojson", "degrees-declared-utm", "swapped-bbox"])
def test_an_aoi_in_another_crs_than_declared_names_the_crs_it_appears_to_be_in(tiny_scene, tmp_path, case):
    """Issue 16: an AOI whose coordinates are in another CRS than the one it declares (UTM metres
    in a GeoJSON, which is WGS84 by definition; degrees in a file that says UTM; a bbox with lat/lon
    swapped) is refused as the AOI's error, with both bounds and the CRS it appears to be in; `tile`
    leaves nothing behind."""
    import json

    from pyproj import Transformer

    from sarflow.data.grid import utm_epsg

    w, s, e, n = _footprint84(tiny_scene)
    utm = utm_epsg((w + e) / 2, (s + n) / 2)
    to_utm = Transformer.from_crs(4326, utm, always_xy=True)
    (x0, x1), (y0, y1) = to_utm.transform([w, e], [s, n])

    def polygon(a, b, c, d):
        return {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}

    aoi = tmp_path / "aoi.geojson"
    if case == "metres-in-a-geojson":
        aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": polygon(x0, y0, x1, y1)}]}))
        needles = [f"read as EPSG:{utm}, not as the declared EPSG:4326", f"{round(x0, 5)}"]
    elif case == "degrees-declared-utm":
        aoi.write_text(json.dumps({"type": "FeatureCollection",
                                   "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{utm}"}},
                                   "features": [{"type": "Feature", "properties": {}, "geometry": polygon(w, s, e, n)}]}))
        needles = [f"read as EPSG:4326, not as the declared EPSG:{utm}"]
    else:
        aoi = [s, w, n, e]
        needles = ["read as EPSG:4326 with x and y swapped"]
    from pathlib import Path

    path = _catalog(tiny_scene, tmp_path, lambda d: d["grid"].update(aoi=str(aoi) if isinstance(aoi, Path) else aoi))
    res = _sarflow("ingest", path)
    where = str(aoi) if isinstance(aoi, Path) else str(path)
    _refused(res, where, "overlaps none of the sources", "which cover", *needles)
    assert res.exit_code == 2 and "does not overlap the AOI" not in res.output  # no raster is blamed
    out = tmp_path / "chips.zarr"
    _refused(_sarflow("tile", path, "--out", out), "overlaps none of the sources", *needles)
    assert not list(tmp_path.glob("chips.zarr*"))


def test_versioning_an_s3_store_while_its_endpoint_is_down_says_so(monkeypatch):
    """Issue 16: `sarflow version s3://...` with the endpoint down gave a botocore traceback."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.delenv("SARFLOW_S3_ENDPOINT", raising=False)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    res = _sarflow("version", "s3://outage/chips.zarr")
    line = _error_line(res)
    for needle in ("s3://outage/chips.zarr", closed, "EndpointConnectionError", "nothing was written",
                   "rerun `sarflow version s3://outage/chips.zarr`"):
        assert needle in line, (needle, line)
    assert "Traceback" not in res.output

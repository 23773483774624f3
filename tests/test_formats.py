"""Embeddings and encoders in the ecosystem's formats, read the way the user's tools read them:
the embeddings partition as GeoParquet (geopandas, pyarrow's file metadata, DuckDB), and the
registered encoder as plain weights + a JSON config that rebuild a torch module without the pickle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_features

MODEL = "sarflow-encoder-mae"


@pytest.fixture(scope="module")
def featured(tiny_store, tmp_path_factory):
    import mlflow

    built = tiny_features(tiny_store, tmp_path_factory.mktemp("formats"), MODEL)
    mlflow.set_tracking_uri(built["uri"])
    return built


def _part(featured) -> Path:
    return Path(featured["embed"]["partition"]) / "part-00000.parquet"


def _chips(featured):
    import geopandas as gpd

    return gpd.read_parquet(Path(featured["store"]) / "chips.parquet")


# ------------------------------------------------------------------ GeoParquet embeddings

def test_embeddings_are_geoparquet_that_geopandas_reads_with_the_chip_footprints(featured):
    import geopandas as gpd

    gdf = gpd.read_parquet(_part(featured))
    assert isinstance(gdf, gpd.GeoDataFrame)
    assert gdf.geometry.name == "geometry"
    assert gdf.crs is not None and gdf.crs.to_epsg() == 4326
    chips = _chips(featured).set_index("chip_id")
    assert len(gdf) == len(chips)
    expected = chips.loc[gdf["chip_id"], "geometry"].to_numpy()
    assert set(gdf.geom_type) == {"Polygon"}
    assert all(a.equals_exact(b, 0) for a, b in zip(gdf.geometry.to_numpy(), expected))
    # the old columns are still there, lon/lat the footprint's centroid
    for col in ("embedding", "model_name", "model_version", "dataset_version", "event_timestamp", "lon", "lat", "split"):
        assert col in gdf.columns
    np.testing.assert_allclose(gdf["lon"], gdf.geometry.centroid.x)
    np.testing.assert_allclose(gdf["lat"], gdf.geometry.centroid.y)


def test_geo_file_metadata_follows_geoparquet_1_1(featured):
    import pyarrow.parquet as pq
    from pyproj import CRS

    meta = pq.read_metadata(_part(featured)).metadata
    assert b"geo" in meta
    geo = json.loads(meta[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB"
    assert col["geometry_types"] == ["Polygon"]
    assert CRS.from_json_dict(col["crs"]).to_epsg() == 4326
    bounds = _chips(featured).total_bounds
    np.testing.assert_allclose(col["bbox"], bounds)
    assert pq.read_schema(_part(featured)).field("geometry").type == "binary"


def test_duckdb_reads_the_embeddings(featured):
    duckdb = pytest.importorskip("duckdb", reason="the duckdb package is not installed in this environment "
                                                  "(and its spatial extension cannot be downloaded here)")
    con = duckdb.connect()
    n = con.execute("SELECT count(*) FROM read_parquet(?)", [str(_part(featured))]).fetchone()[0]
    assert n == featured["embed"]["rows"]
    # the geometry is WKB bytes DuckDB hands back as a blob (GEOMETRY with the spatial extension)
    blob = con.execute("SELECT geometry FROM read_parquet(?) LIMIT 1", [str(_part(featured))]).fetchone()[0]
    import shapely

    assert shapely.from_wkb(bytes(blob)).geom_type == "Polygon"


def test_readers_of_the_embeddings_still_work(featured):
    from sarflow.features.embed import embedding_matrix, read_embeddings

    table = read_embeddings(featured["root"], MODEL, "1")
    emb = embedding_matrix(table)
    assert emb.shape == (featured["embed"]["rows"], featured["embed"]["dim"])
    assert np.isfinite(emb).all()


# ------------------------------------------------------------------ plain encoder

def _plain_dir(featured, tmp_path) -> Path:
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(MODEL, "1")
    uri = mv.tags["sarflow.plain_encoder"]
    assert uri == f"runs:/{mv.run_id}/plain_encoder"
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))


def test_plain_encoder_equals_the_registered_mlflow_model(featured, tmp_path):
    import mlflow

    from sarflow.data.chipstore import open_chip_group
    from sarflow.features.embed import encoder_arrays, encoder_chips
    from sarflow.training.export import load_plain_encoder

    folder = _plain_dir(featured, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "state_dict.pt"]
    cfg = json.loads((folder / "config.json").read_text())
    ref = mlflow.pytorch.load_model(f"models:/{MODEL}/1", map_location="cpu").eval()
    assert cfg["inputs"] == [{"group": g, "source": s, "bands": b} for g, s, b in ref.sources]
    assert cfg["channels"] == ref.channel_names
    assert cfg["embedding_dim"] == featured["embed"]["dim"]
    np.testing.assert_allclose(cfg["mean"], ref.mean.numpy())
    np.testing.assert_allclose(cfg["std"], ref.std.numpy())
    vit = next(iter(cfg["groups"].values()))["vit"]
    assert (vit["patch"], vit["depth"], vit["dim"], vit["heads"]) == (8, 1, 32, 2)

    plain = load_plain_encoder(folder)
    assert isinstance(plain, torch.nn.Module) and not plain.training
    store = str(featured["store"])
    x = torch.from_numpy(encoder_chips(encoder_arrays(open_chip_group(store), ref, store), slice(0, 12)))
    with torch.no_grad():
        a, b = plain(x), ref(x)
    assert a.shape == (12, cfg["embedding_dim"])
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_plain_encoder_loads_without_mlflow_lightning_zarr_or_pickle(featured, tmp_path):
    folder = _plain_dir(featured, tmp_path)
    code = (
        "import sys, torch\n"
        "from sarflow.training.export import load_plain_encoder\n"
        f"m = load_plain_encoder({str(folder)!r})\n"
        "n = sum(len(b['bands']) for b in __import__('json').load(open(sys.argv[1]))['inputs'])\n"
        "print(tuple(m(torch.zeros(2, n, 32, 32)).shape))\n"
        "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('mlflow', 'lightning', 'zarr', 'feast', 'xarray'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder / "config.json")], capture_output=True, text=True,
                         check=True).stdout
    assert f"(2, {featured['embed']['dim']})" in out
    assert "HEAVY []" in out


def test_plain_config_of_a_multimodal_encoder_round_trips(tmp_path):
    """CLIP-style encoders (one ViT + linear projection per group, normalised fused output)."""
    from sarflow.training.export import load_plain_encoder, save_plain_encoder
    from sarflow.training.methods import Group, OptimConfig, build_method
    from sarflow.training.vit import ViTConfig

    groups = [Group("s1", "s1grd", ["VV", "VH"], [-12.0, -20.0], [5.0, 6.0]),
              Group("s2", "s2rgb", ["B04", "B03", "B02"], [0.1, 0.1, 0.1], [0.05, 0.05, 0.05])]
    module = build_method("clip", groups, ViTConfig(size="tiny", patch=8, depth=1, dim=32, heads=2), OptimConfig(),
                          embed_dim=16)
    enc = module.export_encoder()
    save_plain_encoder(enc, tmp_path / "encoder")
    plain = load_plain_encoder(tmp_path / "encoder")
    x = torch.randn(3, 5, 16, 16)
    x[0, 2:] = float("nan")  # a chip without its optical group still embeds
    with torch.no_grad():
        a, b = plain(x), enc(x)
    assert a.shape == (3, 16)
    assert torch.allclose(a, b, atol=1e-6)


def test_a_folder_without_the_files_is_a_clear_error(tmp_path):
    from sarflow.training.export import load_plain_encoder

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_plain_encoder(tmp_path)

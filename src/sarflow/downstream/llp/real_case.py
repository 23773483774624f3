"""The real Kansas case: LLP on a Sen1Floods11 chip (water vs dry from S1 only), bags = the county
(FIPS 20121) cut into grid cells, bag proportions aggregated from the hand label raster.

It runs the same path as any user's data: a catalog that declares the S1 backscatter as an input
and the hand label as a categorical label (0 dry, 1 water, nodata -1, as Sen1Floods11 documents
it; its raster carries no nodata tag), `sarflow tile` on the chip's own grid, then `run_llp` with
the label raster (whose nodata comes from the store's declaration).
"""

from __future__ import annotations

from pathlib import Path

from sarflow.downstream.llp.config import MODELS
from sarflow.errors import InputError

KANSAS = "USA_905409"
KANSAS_FIPS = "20121"
WATER_CLASSES = {0: "dry", 1: {"name": "water", "color": "#1f5fd0"}}  # Sen1Floods11's hand labels; -1 is no data


def case_files(real_dir: str | Path, scene: str = KANSAS) -> tuple[Path, Path, Path]:
    real = Path(real_dir)
    files = (real / "sen1floods11" / f"{scene}_S1Hand.tif", real / "sen1floods11" / f"{scene}_LabelHand.tif",
             real / "admin" / "geojson-counties-fips.json")
    for p in files:
        if not p.is_file():
            raise InputError(str(p), "missing real-data file")
    return files


def case_catalog(s1_path: Path, label_path: Path, chip: int = 32) -> dict:
    """The scene's catalog on its own grid (CRS, pixel size, origin at its corner): S1 VV/VH in dB
    as the input, the hand label `water` as a categorical label."""
    import rasterio

    with rasterio.open(s1_path) as src:
        crs, res, bounds = src.crs.to_epsg(), float(src.res[0]), src.bounds
    if crs is None:
        raise InputError(str(s1_path), "the raster's CRS has no EPSG code")
    return {"grid": {"crs": int(crs), "resolution": res, "chip_size": chip, "aoi": "intersection",
                     "origin": [float(bounds.left), float(bounds.top)]},
            "sources": [{"name": "s1", "uris": [str(s1_path)], "bands": ["VV", "VH"], "units": "dB",
                         "kind": "continuous"},
                        {"name": "water", "uris": [str(label_path)], "bands": ["water"], "units": "class",
                         "kind": "categorical", "nodata": -1, "classes": WATER_CLASSES}]}


def county_cells(counties: Path, raster: Path, fips: str, grid: int):
    """Bag polygons: county `fips` cut into grid x grid cells over the raster (id column `bag_id`)."""
    import geopandas as gpd
    import rasterio
    import numpy as np
    import shapely

    with rasterio.open(raster) as src:
        crs, bounds = src.crs, src.bounds
    county = gpd.read_file(counties)
    county = county[county["id"].astype(str) == fips]
    if county.empty:
        raise InputError(str(counties), f"no county with FIPS {fips}")
    geom = county.to_crs(crs).geometry.iloc[0]
    xs = np.linspace(bounds.left, bounds.right, grid + 1)
    ys = np.linspace(bounds.top, bounds.bottom, grid + 1)
    polys, ids = [], []
    for i in range(grid):
        for j in range(grid):
            part = shapely.intersection(geom, shapely.box(xs[j], ys[i + 1], xs[j + 1], ys[i]))
            if not part.is_empty and part.area > 0:
                polys.append(part)
                ids.append(f"{fips}-g{i}{j}")
    if not polys:
        raise InputError(str(counties), f"county {fips} does not overlap {raster}")
    return gpd.GeoDataFrame({"bag_id": ids}, geometry=polys, crs=crs)


def run_real_case(real_dir: str | Path, tracking_uri: str, out_dir: str | Path, *, chip: int = 32, grid: int = 4,
                  models: tuple[str, ...] = MODELS, steps: int = 300, lr: float = 0.03, loss: str = "kl",
                  test_fraction: float = 0.25, seed: int = 0, bag_sizes: tuple[int, ...] = (1, 2, 4),
                  experiment: str = "sarflow-llp-real", scene: str = KANSAS, fips: str = KANSAS_FIPS) -> dict:
    """LLP on the real Kansas Sen1Floods11 chip (water vs dry from S1), logged to MLflow as the run
    `llp-real-<scene>` (not registered). Writes into `out_dir`: the catalog, the store, the bag
    polygons, the bags, the tables and plots. Returns `run_llp`'s result with `store`."""
    import yaml

    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile
    from sarflow.downstream.llp.config import LLPConfig
    from sarflow.downstream.llp.run import run_llp

    s1_path, label_path, counties = case_files(real_dir, scene)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalog = out / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(case_catalog(s1_path, label_path, chip), sort_keys=False))
    store = tile(load_catalog(catalog), out / "chips.zarr", TileOptions(overwrite=True), show_progress=False)
    polygons = out / "bags.geojson"
    polygons.unlink(missing_ok=True)
    county_cells(counties, label_path, fips, grid).to_file(polygons, driver="GeoJSON")
    cfg = LLPConfig(store=str(store), polygons=str(polygons), tracking_uri=tracking_uri, id_column="bag_id",
                    label_raster=str(label_path), models=tuple(models), loss=loss, steps=steps, lr=lr,
                    experiment=experiment, register=False, task=f"llp-real-{scene}", seed=seed, split="bags",
                    test_fraction=test_fraction, bag_sizes=tuple(bag_sizes), hidden=16, prototypes=32, conv_stride=8,
                    out_dir=str(out))
    return {**run_llp(cfg), "store": str(store)}

"""Chip-to-bag membership (learning from label proportions) as features.

Two files under ``<root>/bags/``, both written atomically (temporary file + ``os.replace``):

- ``chip_bags.parquet``: ONE ROW PER CHIP that lies in at least one bag, the offline source of
  Feast's ``chip_bags`` view. Columns (the contract; do not change):
  ``chip_id`` (string), ``bag_ids`` (list<string>), ``bag_weights`` (list<float64>, summing to
  1 per chip), ``area_fractions`` (list<float64>: the share of the chip inside each bag polygon),
  ``event_timestamp`` (timestamp[us, UTC]). Chips outside every polygon have no row; they are
  reported by `sarflow.downstream.llp.bags.chip_bags` (``Bags.outside``).
- ``chip_bags_geo.parquet``: GeoParquet of the membership rows (chip_id, index, bag_id, weight,
  area_fraction) with the chip footprint as geometry (EPSG:4326), readable by geopandas.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sarflow.errors import InputError

BAGS = "bags"
CHIP_BAGS = "chip_bags.parquet"
CHIP_BAGS_GEO = "chip_bags_geo.parquet"

SCHEMA = pa.schema([
    ("chip_id", pa.string()),
    ("bag_ids", pa.list_(pa.string())),
    ("bag_weights", pa.list_(pa.float64())),
    ("area_fractions", pa.list_(pa.float64())),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])


def chip_bags_table(bags, chips: pd.DataFrame, timestamp: datetime | None = None) -> pa.Table:
    """The one-row-per-chip Arrow table (chips in the order of `chips`)."""
    ts = (timestamp or datetime.now(timezone.utc)).replace(microsecond=0)
    m = bags.members
    order = {c: i for i, c in enumerate(chips["chip_id"].astype(str))}
    m = m.assign(chip_id=m["chip_id"].astype(str), bag_id=m["bag_id"].astype(str))
    m = m.assign(_o=m["chip_id"].map(order).fillna(len(order))).sort_values(["_o", "bag_id"], kind="stable")
    ids, bag_ids, weights, fractions = [], [], [], []
    for chip_id, g in m.groupby("chip_id", sort=False):
        w = g["weight"].to_numpy(np.float64)
        ids.append(chip_id)
        bag_ids.append(g["bag_id"].tolist())
        weights.append((w / w.sum()).tolist())
        fractions.append(g["area_fraction"].to_numpy(np.float64).tolist())
    return pa.table({"chip_id": ids, "bag_ids": bag_ids, "bag_weights": weights, "area_fractions": fractions,
                     "event_timestamp": pa.array([ts] * len(ids), pa.timestamp("us", tz="UTC"))}, schema=SCHEMA)


def _chip_geometries(chips: pd.DataFrame, crs: str | None):
    import geopandas as gpd
    import shapely

    if "geometry" in chips.columns:
        geom = chips["geometry"].to_numpy()
        if len(geom) and isinstance(geom[0], (bytes, bytearray)):
            return gpd.GeoSeries(shapely.from_wkb(geom), crs="EPSG:4326", index=chips.index)
        return gpd.GeoSeries(geom, crs=crs or "EPSG:4326", index=chips.index).to_crs("EPSG:4326")
    if crs is None:
        raise InputError("chips", "no geometry column and no CRS for minx..maxy")
    boxes = shapely.box(chips["minx"].to_numpy(), chips["miny"].to_numpy(), chips["maxx"].to_numpy(),
                        chips["maxy"].to_numpy())
    return gpd.GeoSeries(boxes, crs=crs, index=chips.index).to_crs("EPSG:4326")


def write_chip_bags(bags, chips: pd.DataFrame, root: str | Path, crs: str | None = None) -> str | Path:
    """Writes ``<root>/bags/chip_bags.parquet`` (one row per chip) and ``chip_bags_geo.parquet``
    (GeoParquet of memberships); returns the path of the first. `chips` is the chip table (its
    WKB ``geometry`` in EPSG:4326, or minx..maxy in `crs`)."""
    import geopandas as gpd

    from sarflow.data.paths import join, write_atomic

    table = chip_bags_table(bags, chips)
    write_atomic(join(root, BAGS, CHIP_BAGS), lambda tmp: pq.write_table(table, tmp))
    geoms = _chip_geometries(chips, crs)
    by_id = pd.Series(geoms.values, index=chips["chip_id"].astype(str).to_numpy())
    m = bags.members.assign(chip_id=bags.members["chip_id"].astype(str), bag_id=bags.members["bag_id"].astype(str))
    gdf = gpd.GeoDataFrame(m[["chip_id", "index", "bag_id", "weight", "area_fraction"]].reset_index(drop=True),
                           geometry=list(by_id.loc[m["chip_id"]].to_numpy()) if len(m) else [], crs="EPSG:4326")
    write_atomic(join(root, BAGS, CHIP_BAGS_GEO), lambda tmp: gdf.to_parquet(tmp))
    return join(root, BAGS, CHIP_BAGS)


def read_chip_bags(root: str | Path) -> pd.DataFrame:
    """The one-row-per-chip table as pandas (lists as arrays)."""
    path = Path(root) / BAGS / CHIP_BAGS
    if not path.is_file():
        raise InputError(str(path), "no chip bags written yet (run `sarflow llp train`)")
    return pq.read_table(path).to_pandas()


def read_chip_bags_geo(root: str | Path):
    import geopandas as gpd

    path = Path(root) / BAGS / CHIP_BAGS_GEO
    if not path.is_file():
        raise InputError(str(path), "no chip bag geometries written yet (run `sarflow llp train`)")
    return gpd.read_parquet(path)

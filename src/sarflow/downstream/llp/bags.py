"""Bags: chips x bag polygons with area weights for chips on borders (`chip_bags`), and the
bag x chip matrix that averages chip predictions over each bag (`bag_matrix`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
import torch

from sarflow.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Bags:
    members: pd.DataFrame  # chip_id, index, bag_id, weight (a chip's weights sum to 1), area_fraction
    outside: list[str]  # chips in no polygon: reported, not dropped silently
    proportions: pd.DataFrame  # bag_id -> class proportion columns


def chip_bags(chips: pd.DataFrame, grid_crs: str, polygons, id_column: str, stats: pd.DataFrame,
              classes: list[int], *, polygons_source: str = "bag polygons",
              stats_source: str = "bag statistics") -> Bags:
    """Intersects chips (minx..maxy in the grid CRS) with bag polygons (a GeoDataFrame).

    `polygons_source` / `stats_source` name the files in error messages."""
    if id_column not in polygons.columns:
        raise InputError(polygons_source, f"the polygons have no column {id_column!r} (they have {list(polygons.columns)})")
    if id_column not in stats.columns:
        raise InputError(stats_source, f"the statistics have no column {id_column!r} (they have {list(stats.columns)})")
    polys = polygons.to_crs(grid_crs)
    boxes = shapely.box(chips["minx"].to_numpy(), chips["miny"].to_numpy(), chips["maxx"].to_numpy(), chips["maxy"].to_numpy())
    area = shapely.area(boxes)
    tree = shapely.STRtree(polys.geometry.values)
    box_idx, poly_idx = tree.query(boxes, predicate="intersects")
    inter = shapely.area(shapely.intersection(boxes[box_idx], polys.geometry.values[poly_idx]))
    df = pd.DataFrame({"pos": box_idx, "bag_id": polys[id_column].to_numpy()[poly_idx], "area_fraction": inter / area[box_idx]})
    df = df[df.area_fraction > 1e-9]
    covered = df.groupby("pos")["area_fraction"].transform("sum")
    df["weight"] = df.area_fraction / covered
    df["chip_id"] = chips["chip_id"].to_numpy()[df.pos]
    df["index"] = chips["index"].to_numpy()[df.pos]
    outside = sorted(set(chips["chip_id"]) - set(df.chip_id))
    cols = [f"frac_{c}" for c in classes]
    missing = [c for c in cols if c not in stats.columns]
    if missing:
        raise InputError(stats_source, f"missing proportion columns {missing}")
    stats = stats.assign(**{id_column: stats[id_column].astype(str)})
    df["bag_id"] = df["bag_id"].astype(str)
    props = stats.set_index(id_column)[cols].fillna(0.0)
    unknown = sorted(set(df.bag_id) - set(props.index))
    if unknown:
        raise InputError(stats_source, f"no proportions for bag(s) {unknown[:5]}")
    total = props.sum(axis=1)
    empty = sorted(set(props.index[~(total > 0)]) & set(df.bag_id))
    if empty:  # a bag with no labelled pixel has no proportions to learn from: not a bag
        log.warning("%s: bag(s) %s have no class proportions (no labelled pixel): left out", stats_source, empty[:5])
        df = df[~df.bag_id.isin(empty)].copy()
        df["weight"] = df.area_fraction / df.groupby("pos")["area_fraction"].transform("sum")
        outside = sorted(set(chips["chip_id"]) - set(df.chip_id))
    props = props[total > 0]
    props = props.div(props.sum(axis=1), axis=0)
    return Bags(members=df[["chip_id", "index", "bag_id", "weight", "area_fraction"]].reset_index(drop=True),
                outside=outside, proportions=props)


def bag_matrix(bags: Bags, n_rows: int, row_of: dict[int, int]) -> tuple[torch.Tensor, list[str]]:
    """(bags, rows) matrix of normalised membership weights: bag prediction = A @ instance predictions.

    A chip contributes to a bag in proportion to its area inside the bag polygon (its
    `area_fraction`): a border chip half inside counts half."""
    m = bags.members
    ids = sorted(m.bag_id.unique())
    pos = {b: i for i, b in enumerate(ids)}
    keep = m["index"].map(lambda i: int(i) in row_of).to_numpy(bool)
    m = m[keep]
    a = torch.zeros(len(ids), n_rows, dtype=torch.float64)
    rows = torch.tensor([row_of[int(i)] for i in m["index"]], dtype=torch.long)
    cols = torch.tensor([pos[b] for b in m["bag_id"]], dtype=torch.long)
    a.index_put_((cols, rows), torch.tensor(m["area_fraction"].to_numpy(np.float64)), accumulate=True)
    a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return a.float(), ids

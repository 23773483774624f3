"""What the LLP models see and are scored on: bag polygons and proportions (a statistics CSV, or
aggregated from a label raster), chip features and pixels, fine labels of a chip store
(`prepare_store_data`), the train/test split of bags and merged bags for the bag-size curve."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.llp.bags import Bags, chip_bags
from sarflow.downstream.llp.config import LLPConfig
from sarflow.errors import InputError

log = logging.getLogger(__name__)


def read_polygons(path: str | Path, id_column: str):
    import geopandas as gpd

    p = Path(path)
    if not p.is_file():
        raise InputError(str(path), "the polygons file does not exist")
    try:
        gdf = gpd.read_file(p)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input
        raise InputError(str(path), f"not a readable vector file ({type(e).__name__}: {e})") from None
    if id_column not in gdf.columns:
        raise InputError(str(path), f"the polygons have no column {id_column!r} (they have "
                                    f"{[c for c in gdf.columns if c != 'geometry']})")
    if gdf.crs is None:
        raise InputError(str(path), "the polygons have no CRS")
    gdf[id_column] = gdf[id_column].astype(str)
    if gdf[id_column].duplicated().any():
        gdf = gdf.dissolve(by=id_column, as_index=False)
    return gdf


def read_stats(path: str | Path, id_column: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise InputError(str(path), "the statistics file does not exist")
    try:
        df = pd.read_csv(p, dtype={id_column: str})
    except Exception as e:  # noqa: BLE001
        raise InputError(str(path), f"not a readable CSV ({type(e).__name__}: {e})") from None
    if id_column not in df.columns:
        raise InputError(str(path), f"no id column {id_column!r} (columns: {list(df.columns)})")
    if not [c for c in df.columns if c.startswith("frac_")]:
        raise InputError(str(path), "no class proportion columns (frac_<class>)")
    return df


def stats_classes(stats: pd.DataFrame) -> list[int]:
    return sorted(int(c[len("frac_"):]) for c in stats.columns if c.startswith("frac_") and c[5:].lstrip("-").isdigit())


def polygon_class_fractions(raster: str | Path, polygons, id_column: str, classes: list[int] | None = None,
                            nodata: float | None = None) -> pd.DataFrame:
    """Per-polygon class fractions of a (coarse) label raster by rasterio masking: the
    "statistics" of each bag. Returns id_column, valid_pixels, frac_<class>..."""
    import rasterio
    from rasterio.mask import mask as rio_mask

    p = Path(raster)
    if not p.is_file():
        raise InputError(str(raster), "the label raster does not exist")
    try:
        src = rasterio.open(p)
    except Exception as e:  # noqa: BLE001
        raise InputError(str(raster), f"not a readable raster ({type(e).__name__}: {e})") from None
    with src:
        nod = nodata if nodata is not None else (src.nodata if src.nodata is not None else 0)
        polys = polygons.to_crs(src.crs)
        if classes is None:
            data = src.read(1)
            classes = sorted(int(v) for v in np.unique(data) if v != nod)
        rows = []
        for pid, geom in zip(polys[id_column], polys.geometry):
            try:
                arr, _ = rio_mask(src, [geom], crop=True, filled=True, nodata=nod, indexes=1)
            except ValueError:  # the polygon misses the raster
                arr = np.full((1, 1), nod)
            valid = arr[arr != nod]
            total = int(valid.size)
            rows.append({id_column: str(pid), "valid_pixels": total,
                         **{f"frac_{c}": (float((valid == c).sum()) / total if total else np.nan) for c in classes}})
    return pd.DataFrame(rows)


@dataclass
class LLPData:
    """Everything the models see and are scored on, rows in chip order."""

    chips: pd.DataFrame  # chip_id, index, col, row (grid position for maps), split
    bags: Bags
    bag_pixels: pd.Series  # bag_id -> weight when merging bags (valid pixels or area)
    bag_xy: pd.DataFrame  # bag_id -> x, y centroid (for merging neighbours)
    classes: list[int]
    truth: np.ndarray  # (n, k) chip class fractions from the fine labels
    truth_valid: np.ndarray  # (n,) bool: the chip has fine labels
    features: np.ndarray | None = None  # (n, d) embeddings or band statistics
    pixels: np.ndarray | None = None  # (n, c, H, W) normalised, NaN -> 0
    pixel_norm: tuple[np.ndarray, np.ndarray] | None = None  # mean, std per pixel channel (raw units)
    truth_map: np.ndarray | None = None  # (n, H, W) class position, -1 invalid
    feature_source: str = "embeddings"


def zscore(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return np.nan_to_num((x - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


def band_statistics(pixels_raw: np.ndarray) -> np.ndarray:
    """Per-chip mean and std of every band (raw units, NaN ignored): the fallback features."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.concatenate([np.nanmean(pixels_raw, axis=(2, 3)), np.nanstd(pixels_raw, axis=(2, 3))], axis=1)


def _newest_partition(root: str, model: str | None, version: str | None) -> tuple[str, str]:
    """The embeddings partition to use; ("", "") when the root has none and none was named."""
    from sarflow.features.embed import embedding_partitions, select_partition

    if model is None and version is None and not embedding_partitions(root):
        return "", ""
    found = select_partition(root, model, version)
    return found[0], found[1]


def train_test(data: LLPData, split: str, test_fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Training bags and test rows (chips with fine labels in no training bag)."""
    m = data.bags.members
    bag_ids = sorted(m.bag_id.unique())
    if split == "store":
        row_split = data.chips["split"].to_numpy()
        train_idx = set(data.chips["index"][row_split == "train"].astype(int))
        train_bags = sorted(m[m["index"].astype(int).isin(train_idx)].bag_id.unique())
        test = (row_split != "train") & data.truth_valid
        return train_bags, np.flatnonzero(test)
    if split != "bags":
        raise InputError("split", f"unknown split {split!r}: bags or store")
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * len(bag_ids))))
    if len(bag_ids) < 2:
        raise InputError("bags", f"need at least 2 bags to hold some out, got {len(bag_ids)}")
    test_bags = set(rng.choice(bag_ids, size=min(n_test, len(bag_ids) - 1), replace=False).tolist())
    train_bags = [b for b in bag_ids if b not in test_bags]
    in_train = set(m[m.bag_id.isin(train_bags)]["index"].astype(int))
    in_test = set(m[m.bag_id.isin(test_bags)]["index"].astype(int))
    idx = data.chips["index"].astype(int).to_numpy()
    test = np.array([(i in in_test) and (i not in in_train) for i in idx]) & data.truth_valid
    return train_bags, np.flatnonzero(test)


def subset_bags(bags: Bags, keep: list[str]) -> Bags:
    m = bags.members[bags.members.bag_id.isin(keep)]
    return Bags(members=m.reset_index(drop=True), outside=bags.outside, proportions=bags.proportions.loc[keep])


def merge_bags(data: LLPData, train_bags: list[str], factor: int, seed: int = 0) -> Bags:
    """Merges neighbouring training bags into ~len/factor bags (k-means on the bag centroids);
    the merged proportions are the pixel-weighted means of the merged bags' proportions."""
    bags = subset_bags(data.bags, train_bags)
    if factor <= 1:
        return bags
    from sklearn.cluster import KMeans

    k = max(1, len(train_bags) // factor)
    xy = data.bag_xy.loc[train_bags][["x", "y"]].to_numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(xy) if k > 1 else np.zeros(len(xy), int)
    new_id = {b: f"merged{int(lab):04d}" for b, lab in zip(train_bags, labels)}
    w = data.bag_pixels.loc[train_bags].to_numpy(np.float64)
    props = bags.proportions.loc[train_bags].mul(w, axis=0)
    props["_new"] = [new_id[b] for b in train_bags]
    merged = props.groupby("_new").sum()
    merged = merged.div(merged.sum(axis=1).replace(0, 1), axis=0)
    m = bags.members.assign(bag_id=bags.members.bag_id.map(new_id))
    m = m.groupby(["chip_id", "index", "bag_id"], as_index=False)[["weight", "area_fraction"]].sum()
    return Bags(members=m, outside=bags.outside, proportions=merged)


def chip_fractions(truth_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) class fractions of each chip of a class-position map (n, H, W; -1 invalid), and
    the (n,) count of its valid pixels."""
    counts = np.stack([(truth_map == i).sum(axis=(1, 2)) for i in range(k)], axis=1).astype(np.float64)
    valid = counts.sum(1)
    return counts / np.maximum(valid, 1)[:, None], valid


def block_counts(truth_map: np.ndarray, h: int, w: int, k: int) -> np.ndarray:
    """(n, k, h, w) pixel count of each class in each block of the truth map (n, H, W) cut
    into h x w blocks (trailing rows / columns that fill no block are left out)."""
    n, H, W = truth_map.shape
    sy, sx = H // h, W // w
    t = truth_map[:, : h * sy, : w * sx].reshape(n, h, sy, w, sx)
    return np.stack([(t == c).sum(axis=(2, 4)) for c in range(k)], axis=1)


def _store_pixels(group, modalities: tuple[str, ...], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw pixels (NaN where invalid), normalised pixels (NaN -> 0), per-channel mean and std."""
    from sarflow.downstream.baselines import band_mean_std, read_float

    raws, means, stds = [], [], []
    for name in modalities:
        if name not in group.attrs["modalities"]:
            continue
        arr = group[name]
        raws.append(read_float(arr, n))
        mean, std = band_mean_std(arr)
        means.append(mean)
        stds.append(std)
    if not raws:
        raise InputError("pixel_modalities", f"the store has none of {list(modalities)}")
    raw = np.concatenate(raws, axis=1)
    mean, std = np.concatenate(means), np.concatenate(stds)
    norm = np.nan_to_num((raw - mean[None, :, None, None]) / std[None, :, None, None], nan=0.0, posinf=0.0, neginf=0.0)
    return raw, norm.astype(np.float32), mean, std


def prepare_store_data(cfg: LLPConfig) -> tuple[LLPData, dict]:
    """Bags, features, pixels and fine labels of a chip store."""
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    polygons = read_polygons(cfg.polygons, cfg.id_column)
    if (cfg.stats is None) == (cfg.label_raster is None):
        raise InputError("llp", "give exactly one of --stats (a CSV) or --label-raster (a raster)")
    try:
        group = open_chip_group(cfg.store)
    except Exception as e:  # noqa: BLE001
        raise InputError(cfg.store, f"not a chip store ({type(e).__name__})") from None
    if "modalities" not in group.attrs:
        raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
    chips = read_chip_table(cfg.store).sort_values("index").reset_index(drop=True)
    n = len(chips)
    if cfg.stats is not None:
        stats = read_stats(cfg.stats, cfg.id_column)
        source = cfg.stats
    else:
        stats = polygon_class_fractions(cfg.label_raster, polygons, cfg.id_column,
                                        list(cfg.classes) if cfg.classes else None, cfg.label_nodata)
        source = cfg.label_raster
    classes = list(cfg.classes) if cfg.classes else stats_classes(stats)
    bags = chip_bags(chips, group.attrs["crs"], polygons, cfg.id_column, stats, classes,
                     polygons_source=cfg.polygons, stats_source=source)
    if bags.members.empty:
        raise InputError(cfg.polygons, f"no chip of {cfg.store} intersects any polygon")
    polys_grid = polygons.to_crs(group.attrs["crs"])
    cent = polys_grid.geometry.centroid
    bag_xy = pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=polys_grid[cfg.id_column].astype(str))
    if "valid_pixels" in stats.columns:
        bag_pixels = stats.set_index(stats[cfg.id_column].astype(str))["valid_pixels"].astype(float)
    else:
        bag_pixels = pd.Series(polys_grid.geometry.area.to_numpy(), index=polys_grid[cfg.id_column].astype(str))
    # fine labels (evaluation only)
    if cfg.truth_modality not in group.attrs["modalities"]:
        raise InputError(cfg.store, f"no {cfg.truth_modality!r} modality to evaluate the chips against")
    wc = group[cfg.truth_modality][:n][:, 0]
    code_pos = {c: i for i, c in enumerate(classes)}
    truth_map = np.full(wc.shape, -1, np.int64)
    for c, i in code_pos.items():
        truth_map[wc == c] = i
    truth, valid = chip_fractions(truth_map, len(classes))
    raw, pixels, pmean, pstd = _store_pixels(group, cfg.pixel_modalities, n)
    # chip features: embeddings of the features root, or band statistics
    feature_source, emb_model, emb_version = "band-stats", "", ""
    if cfg.features_root:
        emb_model, emb_version = _newest_partition(cfg.features_root, cfg.model, cfg.version)
    if emb_model:
        from sarflow.features.embed import embedding_matrix, read_embeddings

        table = read_embeddings(cfg.features_root, emb_model, emb_version)
        emb = embedding_matrix(table)
        pos = {c: i for i, c in enumerate(table.column("chip_id").to_pylist())}
        missing = [c for c in chips.chip_id if c not in pos]
        if missing:
            raise InputError(str(Path(cfg.features_root) / "embeddings" / f"model={emb_model}" / f"version={emb_version}"),
                             f"no embeddings for {len(missing)} chip(s) of the store, e.g. {missing[0]}")
        raw_feats = emb[[pos[c] for c in chips.chip_id]]
        feature_source = f"{emb_model}/v{emb_version}"
    else:
        if cfg.model or cfg.version:
            raise InputError("features_root", "a --model/--version needs a --features-root with embeddings")
        raw_feats = band_statistics(raw)
        log.warning("no embeddings under %s: using per-chip band statistics as features", cfg.features_root)
    feats, fmean, fstd = zscore(raw_feats)
    # grid position for the maps: column from x, row from -y (north up)
    side = float((chips.maxx - chips.minx).iloc[0])
    table_chips = pd.DataFrame({"chip_id": chips.chip_id.astype(str), "index": chips["index"].astype(int),
                                "col": np.round((chips.minx - chips.minx.min()) / side).astype(int),
                                "row": np.round((chips.maxy.max() - chips.maxy) / side).astype(int),
                                "split": chips["split"].astype(str) if "split" in chips else "train"})
    data = LLPData(chips=table_chips, bags=bags, bag_pixels=bag_pixels, bag_xy=bag_xy, classes=classes, truth=truth,
                   truth_valid=valid > 0, features=feats, pixels=pixels, pixel_norm=(pmean, pstd), truth_map=truth_map,
                   feature_source=feature_source)
    extra = {"chips_table": chips, "grid_crs": group.attrs["crs"], "feature_norm": (fmean, fstd),
             "raw_features": raw_feats.astype(np.float32), "raw_pixels": raw, "embedding_model": emb_model,
             "embedding_version": emb_version, "stats_source": source}
    return data, extra

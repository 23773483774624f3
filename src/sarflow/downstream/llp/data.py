"""What the LLP models see and are scored on: bag polygons and proportions (a statistics CSV, or
aggregated from a label raster), chip features and pixels, fine labels of a chip store
(`prepare_store_data`), the train/test split of bags and merged bags for the bag-size curve."""

from __future__ import annotations

import logging
import warnings
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


PROPORTION_SUM_TOLERANCE = 0.02


def check_proportions(df: pd.DataFrame, id_column: str, source: str,
                      tolerance: float = PROPORTION_SUM_TOLERANCE) -> None:
    """Refuses proportions that are not proportions: non-numeric or negative values, or a row whose
    ``frac_`` columns do not sum to 1 within `tolerance` (a row that is all zero or all empty is a
    bag with no labelled pixel: allowed, left out later). The InputError names `source`, the rows'
    ids and the columns."""
    cols = [c for c in df.columns if c.startswith("frac_")]
    ids = df[id_column].astype(str).to_numpy()
    try:
        values = df[cols].apply(pd.to_numeric, errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as e:
        raise InputError(source, f"proportion columns must be numbers ({e})") from None
    neg_rows, neg_cols = np.nonzero(values < 0)
    if len(neg_rows):
        where = [f"{ids[r]}/{cols[c]}={values[r, c]:g}" for r, c in zip(neg_rows[:5], neg_cols[:5])]
        raise InputError(source, f"negative proportion(s) in {len(set(neg_rows.tolist()))} row(s): "
                                 f"{', '.join(where)} (proportions are in [0, 1])")
    if np.isinf(values).any():
        raise InputError(source, "infinite proportion(s) (proportions are in [0, 1])")
    total = np.nansum(values, axis=1)
    bad = np.nonzero((total != 0) & (np.abs(total - 1.0) > tolerance))[0]
    if len(bad):
        where = [f"{ids[r]} (sum {total[r]:.4g})" for r in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(source, f"the proportions {cols} of {len(bad)} row(s) do not sum to 1 "
                                 f"(within {tolerance:g}): {', '.join(where)}{more}")


def match_polygons(stats: pd.DataFrame, polygons, id_column: str, stats_source: str, polygons_source: str):
    """The polygons that are bags: those with a statistics row. Statistics ids that name no polygon
    (a typo, another id scheme, another region) are refused, naming `stats_source`, how many and the
    first few, as are ids given twice; a polygon without statistics has no proportions to learn
    from: left out (a warning with the count), like a row with no labelled pixel."""
    ids = stats[id_column].astype(str)
    twice = sorted(set(ids[ids.duplicated()]))
    if twice:
        raise InputError(stats_source, f"{len(twice)} id(s) in column {id_column!r} have several rows: {twice[:5]} "
                                       "(one row of proportions per polygon)")
    known = set(polygons[id_column].astype(str))
    unknown = sorted(set(ids) - known)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InputError(stats_source, f"{len(unknown)} of {len(ids)} id(s) in column {id_column!r} name no polygon of "
                                       f"{polygons_source}: {unknown[:5]}{more} (its ids are like {sorted(known)[:3]})")
    without = sorted(known - set(ids))
    if without:
        log.warning("%s: %d of %d polygon(s) have no row in %s (e.g. %s): not bags, left out", polygons_source,
                    len(without), len(known), stats_source, without[:5])
        polygons = polygons[polygons[id_column].astype(str).isin(set(ids))].reset_index(drop=True)
    return polygons


def stats_classes(stats: pd.DataFrame, source: str = "bag statistics") -> list[int]:
    """The class codes of a statistics table's ``frac_<code>`` columns (sorted); a column whose
    suffix is not an integer code is refused, naming `source`."""
    suffixes = [c[len("frac_"):] for c in stats.columns if c.startswith("frac_")]
    bad = [x for x in suffixes if not x.lstrip("-").isdigit()]
    if bad:
        raise InputError(source, f"proportion columns frac_{{code}} must name integer class codes, not {bad}")
    return sorted(int(x) for x in suffixes)


def llp_label(group, store: str, name: str | None = None):
    """The categorical label source whose class proportions the bags carry: `name`, or the store's
    one categorical label (several: the caller must choose, and the error names them)."""
    return categorical_label(group, store, name, "the one the bag proportions are of with --label (llp.truth_modality)",
                             "LLP learns the class proportions of one")


def categorical_label(group, store: str, name: str | None, choose: str, why: str):
    """`name` (checked: a categorical label of the store), or the store's only categorical label;
    none or several: an InputError naming the store's labels; `choose` says how to pick one."""
    from sarflow.data.chipstore import label_source, label_sources

    labels = label_sources(group, store)
    categorical = [lab.name for lab in labels if lab.kind == "categorical"]
    if name is None:
        if len(categorical) == 1:
            return next(lab for lab in labels if lab.name == categorical[0])
        if not categorical:
            raise InputError(store, f"the store declares no categorical label (its labels: {[lab.name for lab in labels]}): "
                                    f"{why}; declare its classes (or a legend) in the catalog and tile again")
        raise InputError(store, f"the store has several categorical labels {categorical}: choose {choose}")
    lab = label_source(group, name, store)
    if lab.kind != "categorical":
        raise InputError(store, f"label {name!r} is {lab.kind}: a categorical label is needed ({why}; this store's: "
                                f"{categorical})")
    return lab


def check_codes(codes, label, source: str) -> None:
    """Refuses class codes the label does not declare, naming `source` and the codes."""
    unknown = [int(c) for c in codes if int(c) not in label.codes]
    if unknown:
        declared = ", ".join(f"{c['code']}: {c['name']}" for c in label.classes)
        raise InputError(source, f"class code(s) {unknown} are not classes of label {label.name!r} (it declares {declared})")


def declared_nodata(arr) -> float | None:
    """The nodata a store array's catalog declared (attr `nodata`, else `nodata_in_store`); None if
    none or NaN (a float label masks NaN anyway)."""
    for key in ("nodata", "nodata_in_store"):
        v = arr.attrs.get(key)
        if v is None or v == "NaN":
            continue
        v = float(v)
        if np.isfinite(v):
            return v
    return None


def polygon_class_fractions(raster: str | Path, polygons, id_column: str, classes: list[int] | None = None,
                            nodata: float | None = None) -> pd.DataFrame:
    """Per-polygon class fractions of a (coarse) label raster (the pixels whose centre lies in the
    polygon): the "statistics" of each bag. Returns id_column, valid_pixels, frac_<class>...

    `nodata`: the label's nodata (the caller's choice: a flag, else the store's declaration);
    None takes the raster's own tag, and a raster without one is refused (no value is assumed).
    Pixels with codes outside `classes` are not a class: they are left out of every fraction and
    counted (a warning, and ``df.attrs["undeclared"]``: code -> pixels). `classes` None: every code
    the raster shows except nodata."""
    import rasterio
    from rasterio.mask import raster_geometry_mask

    p = Path(raster)
    if not p.is_file():
        raise InputError(str(raster), "the label raster does not exist")
    try:
        src = rasterio.open(p)
    except Exception as e:  # noqa: BLE001
        raise InputError(str(raster), f"not a readable raster ({type(e).__name__}: {e})") from None
    with src:
        nod = nodata if nodata is not None else src.nodata
        if nod is None:
            raise InputError(str(raster), "the label raster has no nodata tag and no nodata is declared for its label: "
                                          "give --label-nodata (llp.label_nodata) or declare `nodata` on the label "
                                          "source in the catalog")
        nod = float(nod)

        def valid_of(a: np.ndarray) -> np.ndarray:
            a = a.ravel()
            return a[~np.isnan(a)] if np.isnan(nod) else a[a != nod]

        polys = polygons.to_crs(src.crs)
        if classes is None:
            classes = sorted(int(v) for v in np.unique(valid_of(src.read(1))))
        classes = [int(c) for c in classes]
        rows, undeclared = [], {}
        for pid, geom in zip(polys[id_column], polys.geometry):
            try:  # the pixels whose centre lies in the polygon, read as they are (the raster's own nodata
                # tag masks nothing here: `nod` decides)
                outside, _, window = raster_geometry_mask(src, [geom], crop=True)
                arr = src.read(1, window=window)[~outside]
            except ValueError:  # the polygon misses the raster
                arr = np.zeros(0, src.dtypes[0])
            valid = valid_of(arr)
            known = np.isin(valid, classes)
            if not known.all():
                codes, counts = np.unique(valid[~known], return_counts=True)
                for c, k in zip(codes.tolist(), counts.tolist()):
                    undeclared[c] = undeclared.get(c, 0) + int(k)
            valid = valid[known]
            total = int(valid.size)
            rows.append({id_column: str(pid), "valid_pixels": total,
                         **{f"frac_{c}": (float((valid == c).sum()) / total if total else np.nan) for c in classes}})
    if undeclared:
        log.warning("%s: %d pixel(s) inside the bags have codes %s that are not classes %s: left out of the proportions",
                    raster, sum(undeclared.values()), sorted(undeclared), classes)
    df = pd.DataFrame(rows)
    df.attrs["undeclared"] = undeclared
    df.attrs["nodata"] = nod
    return df


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
    pixels: np.ndarray | None = None  # (n, c, H, W) normalised, NaN where the store has no data
    pixel_norm: tuple[np.ndarray, np.ndarray] | None = None  # mean, std per pixel channel (raw units)
    truth_map: np.ndarray | None = None  # (n, H, W) class position, -1 invalid
    feature_source: str = "embeddings"
    input_valid: np.ndarray | None = None  # (n,) bool: the chip has some input data (None: all)
    label: str = "label"  # the label source the classes are of
    class_names: list[str] | None = None  # declared names, in the order of `classes`
    class_colors: dict[int, str] | None = None  # code -> colour (declared, else a palette)


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
        test = (row_split == "test") & _scorable(data)
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
    test = np.array([(i in in_test) and (i not in in_train) for i in idx]) & _scorable(data)
    return train_bags, np.flatnonzero(test)


def _scorable(data: LLPData) -> np.ndarray:
    """Chips a model can be scored on: fine labels and some input data."""
    return data.truth_valid & (data.input_valid if data.input_valid is not None else True)


def test_bag_count(data: LLPData, test_rows: np.ndarray) -> int:
    """How many bags the test chips come from."""
    idx = set(data.chips["index"].to_numpy()[test_rows].astype(int))
    m = data.bags.members
    return int(m[m["index"].astype(int).isin(idx)].bag_id.nunique())


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


def store_pixels(group, modalities: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw pixels (NaN at nodata: `chipstore.iter_masked`), normalised pixels (NaN kept), per-channel
    mean and std (the store's train statistics)."""
    from sarflow.data.chipstore import chip_shape, iter_masked
    from sarflow.downstream.baselines import band_mean_std

    raws, means, stds = [], [], []
    for name in modalities:
        arr = group[name]
        raw = np.empty((n,) + tuple(chip_shape(arr)[1:]), np.float32)
        for start, chips in iter_masked(arr, n):
            raw[start:start + len(chips)] = chips
        raws.append(raw)
        mean, std = band_mean_std(arr)
        means.append(mean)
        stds.append(std)
    raw = np.concatenate(raws, axis=1)
    mean, std = np.concatenate(means), np.concatenate(stds)
    with np.errstate(invalid="ignore"):
        norm = ((raw - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    norm[~np.isfinite(norm)] = np.nan
    return raw, norm, mean, std


def store_truth(arr, classes: list[int], n: int) -> np.ndarray:
    """(n, H, W) class position of every pixel of a categorical label (`chipstore.iter_masked`:
    -1 at nodata and for codes that are not among `classes`)."""
    from sarflow.data.chipstore import chip_shape, iter_masked

    truth = np.full((n,) + tuple(chip_shape(arr)[2:]), -1, np.int64)
    for start, chips in iter_masked(arr, n, bands=[0]):
        part = truth[start:start + len(chips)]
        for i, c in enumerate(classes):
            part[chips[:, 0] == c] = i
    return truth


def prepare_store_data(cfg: LLPConfig) -> tuple[LLPData, dict]:
    """Bags, features, pixels and fine labels of a chip store, for the label the catalog declares
    (`llp_label`) and its classes (the statistics' or the declared ones)."""
    from sarflow.data.chipstore import continuous_inputs, open_chip_group, read_chip_table
    from sarflow.data.quicklook import class_colors

    polygons = read_polygons(cfg.polygons, cfg.id_column)
    if (cfg.stats is None) == (cfg.label_raster is None):
        raise InputError("llp", "give exactly one of --stats (a CSV) or --label-raster (a raster)")
    try:
        group = open_chip_group(cfg.store)
    except InputError:  # already names the store and the fix (missing, unfinished, no zarr.json)
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(cfg.store, f"not a chip store ({type(e).__name__})") from None
    if "modalities" not in group.attrs:
        raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
    label = llp_label(group, cfg.store, cfg.truth_modality)
    if cfg.classes:
        check_codes(cfg.classes, label, "classes")
    chips = read_chip_table(cfg.store).sort_values("index").reset_index(drop=True)
    n = len(chips)
    undeclared: dict = {}
    if cfg.stats is not None:
        stats = read_stats(cfg.stats, cfg.id_column)
        found = stats_classes(stats, cfg.stats)
        check_codes(found, label, cfg.stats)
        source = cfg.stats
        classes = sorted(int(c) for c in cfg.classes) if cfg.classes else found
        missing = [f"frac_{c}" for c in classes if f"frac_{c}" not in stats.columns]
        if missing:
            raise InputError(cfg.stats, f"missing proportion columns {missing}")
        check_proportions(stats, cfg.id_column, cfg.stats)
        polygons = match_polygons(stats, polygons, cfg.id_column, cfg.stats, cfg.polygons)
        nodata = None
    else:
        classes = sorted(int(c) for c in cfg.classes) if cfg.classes else list(label.codes)
        nodata = cfg.label_nodata if cfg.label_nodata is not None else declared_nodata(group[label.name])
        stats = polygon_class_fractions(cfg.label_raster, polygons, cfg.id_column, classes, nodata)
        undeclared = dict(stats.attrs.get("undeclared", {}))
        nodata = stats.attrs.get("nodata")
        source = cfg.label_raster
    bags = chip_bags(chips, group.attrs["crs"], polygons, cfg.id_column, stats, classes,
                     polygons_source=cfg.polygons, stats_source=source)
    if bags.members.empty:
        raise InputError(cfg.polygons, f"no chip of {cfg.store} intersects any polygon")
    polys_grid = polygons.to_crs(group.attrs["crs"])
    with warnings.catch_warnings():  # a geographic grid: centroids only place bags for merging neighbours
        warnings.simplefilter("ignore", UserWarning)
        cent = polys_grid.geometry.centroid
    bag_xy = pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=polys_grid[cfg.id_column].astype(str))
    if "valid_pixels" in stats.columns:
        bag_pixels = stats.set_index(stats[cfg.id_column].astype(str))["valid_pixels"].astype(float)
    else:
        bag_pixels = pd.Series(polys_grid.geometry.area.to_numpy(), index=polys_grid[cfg.id_column].astype(str))
    # fine labels (evaluation only), through the one reader: nodata and undeclared codes are no class
    truth_map = store_truth(group[label.name], classes, n)
    truth, valid = chip_fractions(truth_map, len(classes))
    mods = continuous_inputs(group, list(cfg.pixel_modalities) or None, cfg.store, "the pixel model")
    raw, pixels, pmean, pstd = store_pixels(group, mods, n)
    input_valid = np.isfinite(raw).reshape(n, -1).any(axis=1)
    if not input_valid.all():
        log.warning("%s: %d chip(s) have no input data in %s: left out of training and scoring", cfg.store,
                    int((~input_valid).sum()), mods)
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
            raise InputError("features_root", "a --model needs a --features-root with embeddings")
        raw_feats = band_statistics(raw)
        log.warning("no embeddings under %s: using per-chip band statistics of %s as features", cfg.features_root, mods)
    feats, fmean, fstd = zscore(raw_feats)
    # grid position for the maps: column from x, row from -y (north up)
    side = float((chips.maxx - chips.minx).iloc[0])
    table_chips = pd.DataFrame({"chip_id": chips.chip_id.astype(str), "index": chips["index"].astype(int),
                                "col": np.round((chips.minx - chips.minx.min()) / side).astype(int),
                                "row": np.round((chips.maxy.max() - chips.maxy) / side).astype(int),
                                "split": chips["split"].astype(str) if "split" in chips else "train"})
    colors = class_colors(label.classes)
    data = LLPData(chips=table_chips, bags=bags, bag_pixels=bag_pixels, bag_xy=bag_xy, classes=classes, truth=truth,
                   truth_valid=valid > 0, features=feats, pixels=pixels, pixel_norm=(pmean, pstd), truth_map=truth_map,
                   feature_source=feature_source, input_valid=input_valid, label=label.name,
                   class_names=[label.class_name(c) for c in classes], class_colors={c: colors[c] for c in classes})
    extra = {"chips_table": chips, "grid_crs": group.attrs["crs"], "feature_norm": (fmean, fstd),
             "raw_features": raw_feats.astype(np.float32), "raw_pixels": raw, "embedding_model": emb_model,
             "embedding_version": emb_version, "stats_source": source, "label": label, "pixel_modalities": mods,
             "label_nodata": nodata, "undeclared_pixels": undeclared, "stats": stats}
    return data, extra

"""Per-chip label features from the chip store: WorldCover class fractions, water fraction,
mean tree cover and built-up percent. Written as the `chip_labels` offline source
(a local folder or an s3:// prefix, written atomically as `features.embed.write_table_atomic` does)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from sarflow.errors import InputError
from sarflow.data.paths import check_root, join, write_table_atomic

WORLDCOVER = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)


def chip_labels(store: str, root: str | Path, landcover: str = "worldcover", tree: str = "vegetation",
                builtup: str = "builtup") -> str | Path:
    """Writes <root>/labels/labels.parquet (root: a local folder or an s3:// prefix); returns its path."""
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    check_root(root)
    group = open_chip_group(store)
    mods = list(group.attrs["modalities"])
    if landcover not in mods:
        raise InputError(store, f"no land-cover modality {landcover!r} to derive labels from (it has {mods})")
    table = read_chip_table(store).sort_values("index")
    n = int(group.attrs["chips"])
    cols: dict[str, np.ndarray] = {}
    lc = group[landcover]
    nodata = lc.attrs.get("nodata", 0)
    counts = np.zeros((n, len(WORLDCOVER)), np.float64)
    valid = np.zeros(n, np.float64)
    step = int(lc.shards[0])
    for start in range(0, n, step):
        block = lc[start:start + step][:, 0]
        flat = block.reshape(block.shape[0], -1)
        ok = flat != nodata
        valid[start:start + len(block)] = ok.sum(axis=1)
        for j, code in enumerate(WORLDCOVER):
            counts[start:start + len(block), j] = (flat == code).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = counts / valid[:, None]
    for j, code in enumerate(WORLDCOVER):
        cols[f"frac_{code}"] = fractions[:, j]
    cols["water_fraction"] = fractions[:, WORLDCOVER.index(80)]
    for name, col in ((tree, "tree_cover_mean"), (builtup, "builtup_percent_mean")):
        if name in mods:
            arr = group[name]
            nd = arr.attrs.get("nodata_in_store")
            means = np.full(n, np.nan)
            for start in range(0, n, step):
                block = arr[start:start + step][:, 0].astype(np.float64)
                if nd not in (None, "NaN"):
                    block[block == nd] = np.nan
                with np.errstate(invalid="ignore"):
                    means[start:start + len(block)] = np.nanmean(block.reshape(len(block), -1), axis=1)
            cols[col] = means
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    arrow = pa.table({"chip_id": table["chip_id"].tolist(), "split": table["split"].tolist(),
                      **{k: pa.array(v, pa.float64()) for k, v in cols.items()},
                      "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC"))})
    return write_table_atomic(arrow, join(root, "labels", "labels.parquet"))

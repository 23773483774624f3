"""The `chip_labels` offline source of the feature store: the per-chip label statistics of
`data.chip_labels` (`L__frac_<code>`, `L__labelled`, `L__mean`) with chip id, split and timestamp,
written to a local folder or an s3:// prefix atomically."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from sarflow.data.chip_labels import label_features
from sarflow.data.paths import check_root, join, write_table_atomic


KEY_COLUMNS = ("chip_id", "split", "event_timestamp")


def chip_labels(store: str, root: str | Path) -> str | Path:
    """Writes <root>/labels/labels.parquet (root: a local folder or an s3:// prefix); returns its path."""
    from sarflow.data.chipstore import read_chip_table

    check_root(root)
    cols = label_features(store)
    table = read_chip_table(store).sort_values("index")
    n = len(table)
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    arrow = pa.table({"chip_id": table["chip_id"].tolist(), "split": table["split"].tolist(),
                      **{k: pa.array(v, pa.float64()) for k, v in cols.items()},
                      "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC"))})
    return write_table_atomic(arrow, join(root, "labels", "labels.parquet"))

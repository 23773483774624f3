"""The chip store and its reader (for every later stage and users' scripts): arrays, chip table,
attributes, on a local path or s3://."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from sarflow.errors import InputError

CHIPS_TABLE = "chips.parquet"


def open_chip_group(uri: str) -> zarr.Group:
    """The store's Zarr group, from a local path or s3:// (endpoint and keys from the AWS env)."""
    if uri.startswith("s3://"):
        from sarflow.data.storage import s3_settings

        s = s3_settings()
        opts = {"client_kwargs": {"endpoint_url": s.endpoint_url, "region_name": s.region}}
        if s.access_key:
            opts.update(key=s.access_key, secret=s.secret_key)
        else:
            opts["anon"] = True
        return zarr.open_group(uri, mode="r", storage_options=opts)
    return zarr.open_group(uri, mode="r")


def read_chip_table(uri: str):
    import pandas as pd

    path = uri.rstrip("/") + "/" + CHIPS_TABLE
    if uri.startswith("s3://"):
        from sarflow.data.storage import read_bytes
        import io

        return pd.read_parquet(io.BytesIO(read_bytes(path)))
    return pd.read_parquet(path)


@dataclass
class ChipStore:
    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def modalities(self) -> list[str]:
        return list(self.attrs["modalities"])

    @property
    def n_chips(self) -> int:
        return int(self.attrs["chips"])

    def array(self, modality: str) -> zarr.Array:
        if modality not in self.modalities:
            raise InputError(str(self.path), f"the store has no modality {modality!r} (it has {self.modalities})")
        return self.group[modality]

    def read(self, modality: str, index) -> np.ndarray:
        return self.array(modality)[index]

    @cached_property
    def chips(self):
        import geopandas as gpd

        return gpd.read_parquet(self.path / CHIPS_TABLE)

    def summary(self) -> dict:
        splits = self.chips["split"].value_counts().to_dict()
        return {
            "path": str(self.path),
            "crs": self.attrs["crs"],
            "resolution": self.attrs["resolution"],
            "chip_size": self.attrs["chip_size"],
            "chips": self.n_chips,
            "splits": {k: int(v) for k, v in sorted(splits.items())},
            "catalog_hash": self.attrs["catalog_hash"],
            "modalities": {
                m: {k: self.group[m].attrs[k] for k in ("bands", "units", "kind")} | {"shape": list(self.group[m].shape)}
                for m in self.modalities
            },
        }


def open_store(path: str | Path) -> ChipStore:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        if path.with_name(path.name + ".partial").exists():
            raise InputError(str(path), "the store is unfinished (a .partial build exists): rerun `sarflow tile` to resume")
        raise InputError(str(path), "not a chip store (no zarr.json)")
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    if "modalities" not in group.attrs:
        raise InputError(str(path), "a Zarr group but not a sarflow chip store (no 'modalities' attribute)")
    return ChipStore(path=path, group=group)

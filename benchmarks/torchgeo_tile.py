#!/usr/bin/env python
"""The torchgeo anchor of bench_tile.py: the usual torchgeo pattern for cutting aligned chips.

One RasterDataset per source (its files mosaicked by torchgeo, warped on read to the grid CRS
and resolution with the source's resampling), all combined with IntersectionDataset (`&`),
a GridGeoSampler with the same chip size and stride over the chips' extent, a DataLoader
(`stack_samples`) iterating every chip, and every chip written to a Zarr store (one array per
source, shaped like sarflow's: chips x bands x chip x chip; sharded by 64 chips when zarr>=3).

Run by bench_tile.py with a python that has torchgeo 0.8.1 (and zarr):
    PYTHON benchmarks/torchgeo_tile.py --spec SPEC.json --out OUT.zarr --result RESULT.json
SPEC.json (written by bench_tile.py from a sarflow store): crs_wkt, resolution, chip_size,
stride, roi [minx, miny, maxx, maxy], sources [{name, files, bands, kind, resampling, dtype,
stacked}]. It imports nothing from sarflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHARD = 64


def build_dataset(spec: dict):
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from torchgeo.datasets import RasterDataset

    crs = CRS.from_wkt(spec["crs_wkt"])
    res = float(spec["resolution"])
    used, skipped, datasets = [], [], []
    for s in spec["sources"]:
        if s.get("stacked"):
            skipped.append({"name": s["name"], "why": "single-band files stacked into bands"})
            continue
        attrs = {
            "filename_glob": "*",
            "is_image": s["kind"] != "categorical",
            "resampling": Resampling[s["resampling"]],
        }
        cls = type(f"Bench_{s['name']}", (RasterDataset,), attrs)
        datasets.append(cls(paths=list(s["files"]), crs=crs, res=res))
        used.append(s)
    dataset = datasets[0]
    for d in datasets[1:]:
        dataset = dataset & d  # IntersectionDataset
        # torchgeo 0.8.1 keeps every dataset's columns (filepath_1, filepath_2) in the intersection's
        # index, so a third `&` collides in geopandas' overlay; only the geometry is used from it
        dataset.index = dataset.index[["geometry"]]
    return dataset, used, skipped


def open_writer(out: Path, used: list[dict], n: int, chip: int):
    import numpy as np
    import zarr

    v3 = int(zarr.__version__.split(".")[0]) >= 3
    root = zarr.open_group(str(out), mode="w")
    arrays = {}
    for s in used:
        shape = (n, s["bands"], chip, chip)
        chunks = (1, s["bands"], chip, chip)
        dtype = np.dtype(s["dtype"])
        fill = float("nan") if dtype.kind == "f" else 0
        if v3:
            arrays[s["name"]] = root.create_array(s["name"], shape=shape, chunks=chunks,
                                                  shards=(SHARD, s["bands"], chip, chip), dtype=dtype,
                                                  fill_value=fill)
        else:
            arrays[s["name"]] = root.create_dataset(s["name"], shape=shape, chunks=chunks, dtype=dtype,
                                                    fill_value=fill)
    return arrays, ("zarr3-sharded" if v3 else "zarr2-chunk-per-chip")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import numpy as np
    import shapely
    import torch
    import torchgeo
    from torch.utils.data import DataLoader
    from torchgeo.datasets import stack_samples
    from torchgeo.samplers import GridGeoSampler, Units

    t_import = time.perf_counter() - t0
    spec = json.loads(Path(args.spec).read_text())
    chip, stride = int(spec["chip_size"]), int(spec["stride"])

    t1 = time.perf_counter()
    dataset, used, skipped = build_dataset(spec)
    sampler = GridGeoSampler(dataset, size=chip, stride=stride, roi=shapely.box(*spec["roi"]), units=Units.PIXELS)
    queries = list(sampler)
    t_build = time.perf_counter() - t1

    n = len(queries)
    arrays, writer = open_writer(Path(args.out), used, n, chip)
    image_srcs = [s for s in used if s["kind"] != "categorical"]
    mask_srcs = [s for s in used if s["kind"] == "categorical"]
    loader = DataLoader(dataset, sampler=queries, batch_size=SHARD, num_workers=args.workers,
                        collate_fn=stack_samples)

    t2 = time.perf_counter()
    t_write = 0.0
    i0 = 0
    positions = set()
    for q in queries:
        positions.add((round(q[0].start, 3), round(q[1].start, 3)))
    for batch in loader:
        k = batch["image"].shape[0] if "image" in batch else batch["mask"].shape[0]
        tw = time.perf_counter()
        if image_srcs:
            image = batch["image"].numpy()
            b0 = 0
            for s in image_srcs:
                arrays[s["name"]][i0:i0 + k] = image[:, b0:b0 + s["bands"]].astype(s["dtype"])
                b0 += s["bands"]
        if mask_srcs:
            mask = batch["mask"]
            mask = mask.numpy()
            if mask.ndim == 3:  # single-band masks come squeezed
                mask = mask[:, None]
            b0 = 0
            for s in mask_srcs:
                arrays[s["name"]][i0:i0 + k] = mask[:, b0:b0 + s["bands"]].astype(s["dtype"])
                b0 += s["bands"]
        t_write += time.perf_counter() - tw
        i0 += k
    t_iter = time.perf_counter() - t2

    result = {
        "torchgeo": torchgeo.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "writer": writer,
        "dataloader_workers": args.workers,
        "batch_size": SHARD,
        "chips": i0,
        "unique_chip_positions": len(positions),
        "sources_used": [s["name"] for s in used],
        "sources_skipped": skipped,
        "import_s": round(t_import, 3),
        "build_s": round(t_build, 3),
        "iterate_and_write_s": round(t_iter, 3),
        "write_s": round(t_write, 3),
        "note": "GridGeoSampler walks every row of the IntersectionDataset index (one per overlapping "
                "file combination), so mosaicked sources can yield the same position more than once; "
                "its grid starts at each row's clipped bounds, not at sarflow's grid origin",
    }
    Path(args.result).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

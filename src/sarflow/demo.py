"""The demo: everything sarflow can do so far, end to end on the embedded default.

synthetic scene (or your catalog) -> chip store -> DVC version (local remote) -> quicklooks,
with `summary.json` in the output folder holding the same facts as the printed report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sarflow.catalog import load_catalog
from sarflow.report import chip_quicklook
from sarflow.store import open_store
from sarflow.synth import SynthConfig, synthesize
from sarflow.tile import TileOptions, tile
from sarflow.versioning import version_store


def run_demo(out: str | Path, catalog: str | Path | None = None, synth: SynthConfig | None = None,
             tile_options: TileOptions | None = None, show_progress: bool = True) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    if catalog is None:
        catalog = synthesize(out / "scene", synth or SynthConfig())
        timings["synth_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    options = tile_options or TileOptions()
    options = TileOptions(**{**options.__dict__, "overwrite": True})
    store_path = tile(load_catalog(catalog), out / "chips.zarr", options, show_progress=show_progress)
    timings["tile_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    version = version_store(store_path, remote=str(out / "dvc-remote"), repo=out)
    timings["version_s"] = round(time.perf_counter() - t, 2)
    store = open_store(store_path)
    quicklook = chip_quicklook(store, out / "chips_quicklook.png")
    summary = {
        "catalog": str(Path(catalog).resolve()),
        "store": str(store_path),
        "chips_table": str(store_path / "chips.parquet"),
        "dataset_version": {k: version[k] for k in ("dvc_md5", "git_commit", "catalog_hash")},
        "dvc": {"repo": version["repo"], "remote": str(out / "dvc-remote"), "pushed": version["pushed"]},
        "store_summary": store.summary(),
        "plots": {"chips_quicklook": str(quicklook)},
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_report(summary: dict) -> str:
    s = summary["store_summary"]
    lines = [
        "sarflow demo",
        f"  catalog          {summary['catalog']}",
        f"  chip store       {summary['store']}  ({s['chips']} chips of {s['chip_size']} px, {s['crs']}, "
        f"{s['resolution']} m; splits {s['splits']})",
        f"  modalities       {', '.join(s['modalities'])}",
        f"  dataset version  dvc {summary['dataset_version']['dvc_md5']}  catalog {summary['dataset_version']['catalog_hash'][:12]}",
        f"  DVC remote       {summary['dvc']['remote']}",
        f"  quicklook        {summary['plots']['chips_quicklook']}",
        f"  timings          {summary['timings']}",
    ]
    return "\n".join(lines)

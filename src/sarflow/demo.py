"""The demo: everything sarflow can do so far, end to end on the embedded default.

synthetic scene (or your catalog) -> chip store -> DVC version (local remote) -> MAE pretraining
tracked in MLflow (sqlite) and registered -> embeddings of every chip -> Feast (SQLite online
store) -> a similarity query, with `summary.json` in the output folder holding the same facts
as the printed report.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from sarflow.catalog import load_catalog
from sarflow.report import chip_quicklook
from sarflow.store import open_store
from sarflow.synth import SynthConfig, synthesize
from sarflow.tile import TileOptions, tile
from sarflow.versioning import version_store


def run_demo(out: str | Path, catalog: str | Path | None = None, synth: SynthConfig | None = None,
             tile_options: TileOptions | None = None, pretrain_cfg=None, show_progress: bool = True) -> dict:
    import mlflow

    from sarflow.features.embed import embed_store
    from sarflow.features.labels import chip_labels
    from sarflow.features.search import build_index
    from sarflow.features.store import FeatureConfig, apply, materialize, online_features
    from sarflow.training.pretrain import PretrainConfig, pretrain

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def step(name, fn):
        t = time.perf_counter()
        result = fn()
        timings[f"{name}_s"] = round(time.perf_counter() - t, 2)
        return result

    if catalog is None:
        catalog = step("synth", lambda: synthesize(out / "scene", synth or SynthConfig()))
    options = replace(tile_options or TileOptions(), overwrite=True)
    store_path = step("tile", lambda: tile(load_catalog(catalog), out / "chips.zarr", options, show_progress=show_progress))
    version = step("version", lambda: version_store(store_path, remote=str(out / "dvc-remote"), repo=out))
    store = open_store(store_path)
    quicklook = chip_quicklook(store, out / "chips_quicklook.png")

    tracking = f"sqlite:///{out / 'mlflow.db'}"
    cfg = replace(pretrain_cfg or PretrainConfig(store=""), store=str(store_path), tracking_uri=tracking)
    trained = step("pretrain", lambda: pretrain(cfg, show_progress=show_progress))
    mlflow.set_tracking_uri(tracking)
    features_root = out / "features"
    model_uri = f"models:/{trained['registered_model']}/{trained['version']}"
    embedded = step("embed", lambda: embed_store(str(store_path), model_uri, features_root, overwrite=True))
    chip_labels(str(store_path), features_root)
    fcfg = FeatureConfig(root=str(features_root))
    views = step("feast_apply", lambda: apply(fcfg))
    materialized = step("materialize", lambda: materialize(fcfg))
    view = next(v for v in materialized if v.startswith("chip_embeddings_"))
    first = store.chips.sort_values("index")["chip_id"].iloc[0]
    online = online_features(fcfg, [first], [f"{view}:embedding", "chip_labels:water_fraction"])
    index = step("index", lambda: build_index(features_root))
    neighbours = index.similar(first, k=5)
    summary = {
        "catalog": str(Path(catalog).resolve()),
        "store": str(store_path),
        "chips_table": str(store_path / "chips.parquet"),
        "dataset_version": {k: version[k] for k in ("dvc_md5", "git_commit", "catalog_hash")},
        "dvc": {"repo": version["repo"], "remote": str(out / "dvc-remote"), "pushed": version["pushed"]},
        "store_summary": store.summary(),
        "mlflow": {"tracking_uri": tracking, "run_id": trained["run_id"], "registered_model": trained["registered_model"],
                   "version": trained["version"], "first_loss": trained["losses"][0], "last_loss": trained["losses"][-1]},
        "features": {"root": str(features_root), "feast_repo": str(fcfg.repo), "views": views,
                     "materialized": materialized, "embedding_dim": embedded["dim"],
                     "online_example": {"chip_id": first, "embedding_head": list(online.embedding[0][:4]),
                                        "water_fraction": float(online.water_fraction[0])},
                     "similar_to_first_chip": neighbours},
        "plots": {"chips_quicklook": str(quicklook)},
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def format_report(summary: dict) -> str:
    s = summary["store_summary"]
    m, f = summary["mlflow"], summary["features"]
    lines = [
        "sarflow demo",
        f"  catalog          {summary['catalog']}",
        f"  chip store       {summary['store']}  ({s['chips']} chips of {s['chip_size']} px, {s['crs']}, "
        f"{s['resolution']} m; splits {s['splits']})",
        f"  modalities       {', '.join(s['modalities'])}",
        f"  dataset version  dvc {summary['dataset_version']['dvc_md5']}  catalog {summary['dataset_version']['catalog_hash'][:12]}",
        f"  DVC remote       {summary['dvc']['remote']}",
        f"  MLflow           {m['tracking_uri']}  run {m['run_id']}  model {m['registered_model']} v{m['version']}"
        f"  (loss {m['first_loss']:.3f} -> {m['last_loss']:.3f})",
        f"  Feast            {f['feast_repo']}  views {', '.join(v for v in f['views'] if v.startswith('chip_'))}",
        f"  similar chips    {f['online_example']['chip_id']} -> "
        + ", ".join(f"{h['chip_id'].rsplit('_', 2)[-2]}_{h['chip_id'].rsplit('_', 1)[-1]} ({h['similarity']:.3f})"
                    for h in f["similar_to_first_chip"][1:4]),
        f"  quicklook        {summary['plots']['chips_quicklook']}",
        f"  timings          {summary['timings']}",
    ]
    return "\n".join(lines)

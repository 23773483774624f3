"""Every downstream result on top of a finished demo, gathered into one MLflow results report.

`demo_results(out)` reads the demo's `summary.json` and adds to its MLflow: segmentation (ViT
head on the demo's encoder vs U-Net) on the demo's store, the modality ablation (synthetic
clear and clouded scenes), region generalization (synthetic regions A / B_same / B_shifted: a
known shift) and, when the real data is there, the Kansas LLP case; then the results report of
the newest run of every section (`downstream.results_report`). Its products go to
`<out>/results/`, made afresh on every call (the MLflow runs accumulate).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from sarflow.errors import InputError

log = logging.getLogger(__name__)
REGION_SIZE_PX = 512  # the synthetic regions' side: enough held-out chips per region


def demo_results(out: str | Path, real_dir: str | Path | None = None) -> dict:
    """Runs every section missing from the demo's MLflow and reports them all; returns the
    report's result (`build_results_report`) with `real_case` (whether it ran)."""
    from sarflow.downstream.ablation import run_ablation
    from sarflow.downstream.llp.real_case import run_real_case
    from sarflow.downstream.region import run_region_stores
    from sarflow.downstream.results_report import build_results_report
    from sarflow.downstream.segmentation.config import SegmentConfig
    from sarflow.downstream.segmentation.run import run_segmentation
    from sarflow.downstream.synthetic_stores import synth_ablation_stores, synth_region_stores

    out = Path(out)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise InputError(str(summary_path), "no finished demo here (run make demo first)")
    summary = json.loads(summary_path.read_text())
    uri, store, encoder = summary["mlflow"]["tracking_uri"], summary["store"], summary["mlflow"]["encoder"]
    results = out / "results"
    shutil.rmtree(results, ignore_errors=True)

    run_segmentation(SegmentConfig(store=store, tracking_uri=uri, encoder_uri=encoder))
    ablation = results / "ablation"
    run_ablation(synth_ablation_stores(ablation), uri, out_dir=str(ablation))
    regions = results / "regions"
    run_region_stores(synth_region_stores(regions, size_px=REGION_SIZE_PX), tracking_uri=uri, out_dir=str(regions))
    real = Path(real_dir) if real_dir else None
    real_case = real is not None and (real / "sen1floods11").is_dir()
    if real_case:
        run_real_case(real, uri, results / "llp-real")
    else:
        log.warning("%s has no sen1floods11/: the real LLP case is left out of the report", real)
    return {**build_results_report(uri, out_dir=str(results)), "real_case": real_case}

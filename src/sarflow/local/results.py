"""Every downstream result on top of a finished demo, gathered into one MLflow results report.

`demo_results(out)` reads the demo's `summary.json` and adds to its MLflow: segmentation (ViT
head on the demo's encoder vs U-Net) on the demo's store, the modality ablation (synthetic
clear and clouded scenes), region generalization (synthetic regions A / B_same / B_shifted: a
known shift) and, when the real data is there, the Kansas LLP case; then the results report of
the newest run of every section (`downstream.results_report`). Its products go to
`<out>/results/`, made afresh on every call (the MLflow runs accumulate); with `only`, just the
named sections run again (their folders and the report are replaced; the other sections'
newest runs are reported as they are).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from sarflow.errors import InputError

log = logging.getLogger(__name__)
REGION_SIZE_PX = 512  # the synthetic regions' side: enough held-out chips per region
# the report sections this adds to a demo (keys of `downstream.results_report.SECTIONS`) -> their folder
RESULT_SECTIONS = {"segmentation": None, "modality_ablation": "ablation", "region_generalization": "regions",
                   "llp_real": "llp-real"}


def demo_results(out: str | Path, real_dir: str | Path | None = None, only: list[str] | None = None) -> dict:
    """Runs the sections this adds to the demo's MLflow (`only`: just those named, keys of
    RESULT_SECTIONS) and reports every section; returns the report's result
    (`build_results_report`) with `real_case` (whether it ran)."""
    from sarflow.downstream.ablation import run_ablation
    from sarflow.downstream.llp.real_case import run_real_case
    from sarflow.downstream.region import run_region_stores
    from sarflow.downstream.results_report import build_results_report
    from sarflow.downstream.segmentation.config import SegmentConfig
    from sarflow.downstream.segmentation.run import run_segmentation
    from sarflow.downstream.synthetic_stores import synth_ablation_stores, synth_region_stores

    unknown = sorted(set(only or ()) - set(RESULT_SECTIONS))
    if unknown:
        raise InputError(unknown[0], f"no such results section: choose from {', '.join(RESULT_SECTIONS)}")
    wanted = set(only or RESULT_SECTIONS)
    out = Path(out)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise InputError(str(summary_path), "no finished demo here (run make demo first)")
    summary = json.loads(summary_path.read_text())
    uri, store, encoder = summary["mlflow"]["tracking_uri"], summary["store"], summary["mlflow"]["encoder"]
    results = out / "results"
    if only:  # the named sections' products and the report are made afresh, the others' are kept
        for name in [RESULT_SECTIONS[k] for k in sorted(wanted) if RESULT_SECTIONS[k]] + ["report"]:
            shutil.rmtree(results / name, ignore_errors=True)
        (results / "report.json").unlink(missing_ok=True)
    else:
        shutil.rmtree(results, ignore_errors=True)

    if "segmentation" in wanted:
        run_segmentation(SegmentConfig(store=store, tracking_uri=uri, encoder_uri=encoder))
    if "modality_ablation" in wanted:
        ablation = results / RESULT_SECTIONS["modality_ablation"]
        run_ablation(synth_ablation_stores(ablation), uri, out_dir=str(ablation))
    if "region_generalization" in wanted:
        regions = results / RESULT_SECTIONS["region_generalization"]
        run_region_stores(synth_region_stores(regions, size_px=REGION_SIZE_PX), tracking_uri=uri, out_dir=str(regions))
    real = Path(real_dir) if real_dir else None
    real_case = "llp_real" in wanted and real is not None and (real / "sen1floods11").is_dir()
    if real_case:
        run_real_case(real, uri, results / RESULT_SECTIONS["llp_real"])
    elif "llp_real" in wanted:
        log.warning("%s has no sen1floods11/: the real LLP case is left out of the report", real)
    return {**build_results_report(uri, out_dir=str(results)), "real_case": real_case,
            "real_case_left_out": "llp_real" in wanted and not real_case}

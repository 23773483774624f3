"""Label efficiency: what the probe curves say. Summaries over draws with 95 % intervals over
spatial test blocks, the embedding curve (best probe on val at each n), how many labels the
embeddings need to match each baseline (with its uncertainty), the curves as a table and as
plots. Tasks are `tasks.Task` objects (their primary metric and its direction);
`tasks_json` / `tasks_from_json` carry them beside a run's curves.

Intervals (`block_interval`): a hierarchical bootstrap. Each replicate resamples the test
split's spatial blocks with replacement (a chip weighs as often as its block was drawn) and the
draws of the point with replacement, and recomputes the metric (`estimators.weighted_metrics`)
averaged over the resampled draws; the interval is the 2.5-97.5 percentiles. Chips of one block
are not independent, so blocks, not chips, are the unit (`spatial_blocks`).

Label savings (`label_savings`), per task and baseline, against the baseline's score with
every train label (B, interval [B-, B+]) along the embedding curve (E(n), interval [E-(n), E+(n)]),
for a higher-is-better metric (mirrored for lower):
- n_to_match: the smallest n from which on E(n') >= B at every n' >= n (the curve reaches the
  baseline's score);
- "measured": n_to_match < n_all and some smaller n is clearly below (E+ < B-): the saving
  n_all / n_to_match, the crossing bracketed by the sizes tried (`n_range`);
- "at least": already clearly above the baseline (E- > B+) at the smallest n: saving >= n_all / n_min;
- "none": the curve does not reach B even with every label, or only with every label;
- "not measurable": the intervals overlap at every n (the test split cannot tell them apart), the
  curve reaches B but no smaller n is clearly below it (the crossing cannot be located), or an
  interval could not be computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.estimators import PROBES, weighted_metrics
from sarflow.downstream.tasks import Task

DEFAULT_PROBE = PROBES[0]  # chosen when the val split cannot measure a task
BASELINE_SOURCES = ("pixel_stats", "random_init", "scratch")  # the curves beside the embeddings'
BOOTSTRAP = 500  # replicates per interval
MIN_BLOCKS = 8  # fewer test blocks than this: smaller blocks (side shrunk) for the interval
BLOCK_SIDE = 4  # chips: the smallest block side tried first (neighbouring chips are correlated)
LEVEL = 0.95


def spatial_blocks(cells: np.ndarray, side: int | None, min_blocks: int = MIN_BLOCKS,
                   min_side: int = BLOCK_SIDE) -> tuple[np.ndarray, int]:
    """(block id per chip, block side in chips): the test chips' `cells` (ix, iy) grouped in
    `side` x `side` blocks (the splitter's side: `store.attrs["split"]["block_chips"]`, at least
    `min_side`: a splitter's block of one chip would make neighbours independent). Where
    that gives fewer than `min_blocks` blocks the side shrinks (the largest that gives them, down
    to single chips) so the bootstrap has blocks to resample; the side used is returned (and reported)."""
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    side = max(1, int(side or 1), int(min_side))
    while True:
        ids = np.unique(np.floor_divide(cells, side), axis=0, return_inverse=True)[1].ravel()
        if side == 1 or ids.max(initial=-1) + 1 >= min_blocks:
            return ids, side
        side -= 1


def block_interval(task: Task | str, y: np.ndarray, outputs: list[np.ndarray], blocks: np.ndarray,
                   replicates: int = BOOTSTRAP, seed: int = 0, level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the `level` interval of the metric averaged over `outputs` (one
    model output per draw, on the test chips y), by a bootstrap over test `blocks` and draws.
    (nan, nan) with fewer than two blocks: an interval the test split cannot give."""
    blocks = np.asarray(blocks)
    nb = int(blocks.max(initial=-1)) + 1
    if nb < 2 or not outputs:
        return {}
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, nb, nb), minlength=nb) for _ in range(replicates)])
    w = counts[:, blocks].astype(np.float64)  # (replicates, chips)
    d = len(outputs)
    draw_counts = np.stack([np.bincount(rng.integers(0, d, d), minlength=d) for _ in range(replicates)]) / d
    total: dict[str, np.ndarray] = {}
    for k, out in enumerate(outputs):
        for metric, values in weighted_metrics(task, y, out, w).items():
            total[metric] = total.get(metric, 0.0) + draw_counts[:, k] * values
    tail = (1 - level) / 2 * 100
    out = {}
    for metric, values in total.items():
        values = values[np.isfinite(values)]
        out[metric] = ((float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
                       if len(values) >= replicates // 2 else (float("nan"), float("nan")))
    return out


def tasks_json(tasks) -> list[dict]:
    """The tasks as JSON (logged beside the curves, read back by the results report)."""
    from dataclasses import asdict

    return [asdict(t) for t in tasks]


def tasks_from_json(items: list[dict]) -> list[Task]:
    return [Task(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}) for d in items]


def summarize(curves: pd.DataFrame, intervals: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean, std and count over draws per task, source, probe, n, evaluation split and metric,
    with the test points' interval (`ci_low`, `ci_high`: `intervals` rows of task, source,
    probe, n, split, metric, ci_low, ci_high; NaN where none)."""
    keys = ["task", "source", "probe", "n", "is_all", "split", "metric"]
    g = curves.groupby(keys, sort=True)["value"]
    out = g.agg(mean="mean", std=lambda v: float(np.std(v)), draws="count").reset_index()
    if intervals is None or intervals.empty:
        return out.assign(ci_low=np.nan, ci_high=np.nan)
    on = ["task", "source", "probe", "n", "split", "metric"]
    return out.merge(intervals[on + ["ci_low", "ci_high"]], on=on, how="left")


def best_by_val(summary: pd.DataFrame, task: Task, source: str, n: int | None = None) -> str | None:
    """The probe of `source` with the best mean val score at n (default n = all); None when the
    val split was not scored (it cannot measure the task)."""
    metric, higher = task.metric, task.higher_is_better
    s = summary[(summary.task == task.name) & (summary.source == source) & (summary["split"] == "val") & (summary.metric == metric)]
    s = s[s.is_all] if n is None else s[s.n == n]
    s = s.dropna(subset=["mean"])
    if s.empty:
        return None
    order = {p: i for i, p in enumerate(PROBES + ("cnn",))}
    s = s.assign(key=(-s["mean"] if higher else s["mean"]), o=s.probe.map(order)).sort_values(["key", "o"])
    return str(s.iloc[0].probe)


def curve_point(summary: pd.DataFrame, task: str, source: str, probe: str, metric: str, n: int | None = None) -> dict:
    """{mean, std, ci_low, ci_high, draws} of a test point (n None: every train label); NaN where absent."""
    s = summary[(summary.task == task) & (summary.source == source) & (summary.probe == probe) & (summary["split"] == "test")
                & (summary.metric == metric)]
    s = s[s.is_all] if n is None else s[s.n == n]
    if not len(s):
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "draws": 0}
    r = s.iloc[0]
    get = (lambda k: float(r[k]) if k in r.index else float("nan"))
    return {"mean": get("mean"), "std": get("std"), "ci_low": get("ci_low"), "ci_high": get("ci_high"),
            "draws": int(r["draws"])}


def source_curve(summary: pd.DataFrame, task: Task, source: str, default: str = DEFAULT_PROBE) -> list[dict]:
    """Per n, the test point of `source`'s probe: for the embeddings the best on val at that n,
    for a baseline its best on val with every label (the CNN for scratch); `default` where val
    was not scored."""
    part = summary[(summary.task == task.name) & (summary.source == source)]
    fixed = None
    if source == "scratch":
        fixed = "cnn"
    elif source != "embeddings":
        fixed = best_by_val(summary, task, source) or default
    out = []
    for n in sorted(part.n.unique()):
        probe = fixed or best_by_val(summary, task, source, int(n)) or default
        out.append({"n": int(n), "probe": probe, **curve_point(summary, task.name, source, probe, task.metric, int(n))})
    return out


def embedding_curve(summary: pd.DataFrame, task: Task, default: str = DEFAULT_PROBE) -> list[dict]:
    """Per n, the test score (mean, std, interval) of the embedding probe with the best val score
    at that n (`default` where val was not scored)."""
    return source_curve(summary, task, "embeddings", default)


def primary_figures(summary: pd.DataFrame, tasks, default: str = DEFAULT_PROBE) -> dict:
    """The one number per task: the test score of its primary metric by the embedding probe
    chosen on val with every train label (the registered probe), with its interval, and each
    baseline's figure at every label beside it."""
    out = {}
    for task in tasks:
        curve = embedding_curve(summary, task, default)
        if not curve:
            continue
        top = curve[-1]
        base = {}
        for source in BASELINE_SOURCES:
            c = source_curve(summary, task, source, default)
            if c:
                base[source] = {"probe": c[-1]["probe"], "value": c[-1]["mean"], "ci": [c[-1]["ci_low"], c[-1]["ci_high"]]}
        out[task.name] = {"metric": task.metric, "higher_is_better": bool(task.higher_is_better), "probe": top["probe"],
                          "n": top["n"], "value": top["mean"], "ci": [top["ci_low"], top["ci_high"]], "baselines": base}
    return out


def format_figure(value: float, ci=None) -> str:
    """0.812 [0.770, 0.850] (or the value alone when there is no interval; – when unmeasured)."""
    if value is None or not np.isfinite(value):
        return "–"
    if ci is None or not all(v is not None and np.isfinite(v) for v in ci):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def saving_against(curve: list[dict], base: dict, higher: bool) -> dict:
    """Label saving of a `curve` (points {n, mean, ci_low, ci_high}, ascending n) against a
    baseline point {mean, ci_low, ci_high} (see the module doc)."""
    def sign(v):
        return v if higher else -v

    lo_b, hi_b = (base["ci_low"], base["ci_high"]) if higher else (-base["ci_high"], -base["ci_low"])
    b = sign(base["mean"])
    n_all = curve[-1]["n"]
    res = {"n_all": n_all, "n_to_match": None, "label_fraction": None, "saving": None, "n_range": None}
    if not all(np.isfinite([lo_b, hi_b, b])) or not all(np.isfinite([c[k] for c in curve for k in ("mean", "ci_low", "ci_high")])):
        return {**res, "status": "not measurable", "why": "an interval could not be computed (too few test blocks)"}
    mean = [sign(c["mean"]) for c in curve]
    lo = [min(sign(c["ci_low"]), sign(c["ci_high"])) for c in curve]
    hi = [max(sign(c["ci_low"]), sign(c["ci_high"])) for c in curve]
    below = [h < lo_b for h in hi]  # clearly worse than the baseline with every label
    above = [v > hi_b for v in lo]  # clearly better
    if not any(below) and not any(above):
        return {**res, "status": "not measurable", "why": "the intervals overlap at every n"}
    reached = [all(m >= b for m in mean[i:]) for i in range(len(curve))]  # the mean reaches the baseline from here on
    if not reached[-1]:
        return {**res, "status": "none", "why": "below the baseline's score even with every label"
                + (" (clearly)" if below[-1] else " (the intervals overlap)")}
    k = reached.index(True)
    n = curve[k]["n"]
    if k == len(curve) - 1:
        return {**res, "status": "none", "n_to_match": n, "label_fraction": 1.0, "saving": 1.0,
                "why": "reaches the baseline's score only with every label"}
    res.update(n_to_match=n, label_fraction=n / n_all, saving=n_all / n)
    clearly_below = [i for i in range(k) if below[i]]
    if clearly_below:
        res["n_range"] = [curve[clearly_below[-1]]["n"], n]
        return {**res, "status": "measured",
                "why": f"clearly below at n={res['n_range'][0]}, reaching the baseline's score from n={n}"}
    if k == 0 and above[0]:
        return {**res, "status": "at least", "n_range": [None, n], "why": f"clearly above the baseline already at n={n}"}
    return {**res, "n_to_match": None, "label_fraction": None, "saving": None, "status": "not measurable",
            "why": f"reaches the baseline's score from n={n}, but no smaller n is clearly below it"}


def label_savings(summary: pd.DataFrame, tasks, default: str = DEFAULT_PROBE) -> dict:
    """Per task and baseline: the baseline's test score with every train label (and interval),
    and where the embedding curve reaches it, with its uncertainty (module doc): `status`
    (measured, at least, none, not measurable), `n_to_match`, `saving` (n_all / n_to_match),
    `n_range` (the sizes tried that bracket n_to_match) and `why`."""
    out = {}
    for task in tasks:
        curve = embedding_curve(summary, task, default)
        if not curve:
            continue
        res = {}
        for source in BASELINE_SOURCES:
            base_curve = source_curve(summary, task, source, default)
            if not base_curve or not np.isfinite(base_curve[-1]["mean"]):
                continue
            base = base_curve[-1]
            res[source] = {"baseline_probe": base["probe"], "baseline_all": base["mean"],
                           "baseline_ci": [base["ci_low"], base["ci_high"]],
                           **saving_against(curve, base, task.higher_is_better)}
        out[task.name] = res
    return out


def format_saving(s: dict) -> str:
    """One line for a label saving: '4x (n=50 of 200, between 25 and 50)', 'none', 'not measurable'."""
    if s["status"] == "measured":
        return f"{s['saving']:.0f}x (n={s['n_to_match']} of {s['n_all']}; between n={s['n_range'][0]} and {s['n_range'][1]})"
    if s["status"] == "at least":
        return f">= {s['saving']:.0f}x (clearly above at n={s['n_to_match']} of {s['n_all']})"
    return s["status"]


def label_efficiency_table(summary: pd.DataFrame, tasks) -> pd.DataFrame:
    """The curves as a table: per task (of `tasks` that have curves), the test score of its
    primary metric at each n (mean over draws [95 % interval over test blocks]; mean ± std over
    draws for a run without intervals), for the embedding curve (best probe on val at each n) and
    each baseline's best probe on val (the CNN for scratch); columns n=25, ..., all, and on each
    baseline's row the embeddings' label saving against it."""
    rows = []
    savings = label_savings(summary, tasks)
    for task in tasks:
        if summary[summary.task == task.name].empty:
            continue
        metric, higher = task.metric, task.higher_is_better
        n_all = int(summary[summary.task == task.name].n.max())
        for source in ("embeddings",) + BASELINE_SOURCES:
            curve = source_curve(summary, task, source)
            if not curve:
                continue
            label = source if source == "embeddings" else f"{source} ({curve[-1]['probe']})"
            row = {"task": task.name, "metric": f"{metric} ({'higher' if higher else 'lower'} is better)", "features": label}
            for c in curve:
                ci = (c["ci_low"], c["ci_high"])
                text = format_figure(c["mean"], ci)
                if not all(np.isfinite(ci)) and np.isfinite(c["std"]) and c["std"] > 0:
                    text = f"{c['mean']:.3f} ± {c['std']:.3f}"
                row["all" if c["n"] == n_all else f"n={c['n']}"] = text
            if source != "embeddings":
                s = savings.get(task.name, {}).get(source)
                row["label saving (embeddings)"] = format_saving(s) if s else "–"
            rows.append(row)
    table = pd.DataFrame(rows)
    if "label saving (embeddings)" in table:
        table = table[[c for c in table.columns if c != "label saving (embeddings)"] + ["label saving (embeddings)"]]
    return table.fillna("–") if len(table) else table


BAND_CAPTION = ("line: mean test score over draws (each source's probe chosen on val); shaded: 95 % interval of that "
                "mean, a bootstrap resampling spatial test blocks and draws (block_interval)")


def curve_figure(summary: pd.DataFrame, task: Task, title: str = ""):
    """One task's label-efficiency curves as a Figure (None when the task has no test points):
    per source the test score of its chosen probe against n on a log axis (ticks at the sizes
    tried, labels that would overlap left out, the last being every label), the shaded band its
    interval (`BAND_CAPTION`, said on the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from sarflow.data.quicklook import thin_tick_labels

    styles = {"embeddings": "-", "pixel_stats": "--", "random_init": "-.", "scratch": ":"}
    metric, higher = task.metric, task.higher_is_better
    s = summary[(summary.task == task.name) & (summary["split"] == "test") & (summary.metric == metric)]
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    banded = False
    for source in ("embeddings",) + BASELINE_SOURCES:  # the curves of the table: each source's chosen probe
        curve = pd.DataFrame(source_curve(summary, task, source))
        if curve.empty:
            continue
        label = source if source == "embeddings" else f"{source} ({curve.probe.iloc[-1]})"
        line, = ax.plot(curve.n, curve["mean"], styles.get(source, "-"), marker="o", ms=3, label=label)
        ok = np.isfinite(curve["ci_low"].to_numpy(float)) & np.isfinite(curve["ci_high"].to_numpy(float))
        if ok.any():
            banded = True
            ax.fill_between(curve.n, curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log")
    ticks = sorted(int(t) for t in s.n.unique())
    n_all = int(s[s.is_all].n.max()) if s.is_all.any() else None
    ax.set_xticks(ticks, [f"{t}\n(all)" if t == n_all else str(t) for t in ticks])
    ax.minorticks_off()
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("labelled train chips (n, log scale)")
    ax.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{task.name} {title}".strip(), fontsize=10)
    caption = []
    if task.class_names and task.kind != "regression":
        names = ", ".join(task.class_names)
        caption.append(f"classes: {names[:110] + ('…' if len(names) > 110 else '')}")
    elif task.units:
        caption.append(f"target: {task.source} ({task.units})")
    caption.append(BAND_CAPTION if banded else
                   "line: mean test score over draws; no interval: the test split has too few spatial blocks")
    ax.text(0.0, -0.2, "\n".join(caption), transform=ax.transAxes, fontsize=6, va="top", wrap=True)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(facecolor="0.5", alpha=0.3, label="95 % block-bootstrap interval"))
    ax.legend(handles=handles, fontsize=7, ncol=2)
    fig.tight_layout()
    thin_tick_labels(ax)
    return fig


def plot_curves(summary: pd.DataFrame, tasks, out_dir: Path, title: str = "") -> list[Path]:
    """curve_<task>.png per task with test points (`curve_figure`)."""
    import matplotlib.pyplot as plt

    paths = []
    for task in tasks:
        fig = curve_figure(summary, task, title)
        if fig is None:
            continue
        paths.append(out_dir / f"curve_{task.name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths

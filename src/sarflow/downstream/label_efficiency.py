"""Label efficiency: what the probe curves say. Summaries over draws, the embedding curve (best
probe on val at each n), how many labels the embeddings need to match each baseline, the
curves as a table and as plots. Tasks are `tasks.Task` objects (their primary metric and its
direction); `tasks_json` / `tasks_from_json` carry them beside a run's curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.estimators import PROBES
from sarflow.downstream.tasks import Task

DEFAULT_PROBE = PROBES[0]  # chosen when the val split cannot measure a task


def tasks_json(tasks) -> list[dict]:
    """The tasks as JSON (logged beside the curves, read back by the results report)."""
    from dataclasses import asdict

    return [asdict(t) for t in tasks]


def tasks_from_json(items: list[dict]) -> list[Task]:
    return [Task(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}) for d in items]


def summarize(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over draws per task, source, probe, n, evaluation split and metric."""
    g = curves.groupby(["task", "source", "probe", "n", "is_all", "split", "metric"], sort=True)["value"]
    return g.agg(mean="mean", std=lambda v: float(np.std(v)), draws="count").reset_index()


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


def _test_mean(summary: pd.DataFrame, task: str, source: str, probe: str, metric: str, n: int | None = None):
    s = summary[(summary.task == task) & (summary.source == source) & (summary.probe == probe) & (summary["split"] == "test")
                & (summary.metric == metric)]
    s = s[s.is_all] if n is None else s[s.n == n]
    return (float(s.iloc[0]["mean"]), float(s.iloc[0]["std"])) if len(s) else (float("nan"), float("nan"))


def embedding_curve(summary: pd.DataFrame, task: Task, default: str = DEFAULT_PROBE) -> list[dict]:
    """Per n, the test score (mean, std) of the embedding probe with the best val score at that n
    (`default` where val was not scored)."""
    out = []
    for n in sorted(summary[(summary.task == task.name) & (summary.source == "embeddings")].n.unique()):
        probe = best_by_val(summary, task, "embeddings", int(n)) or default
        mean, std = _test_mean(summary, task.name, "embeddings", probe, task.metric, int(n))
        out.append({"n": int(n), "probe": probe, "mean": mean, "std": std})
    return out


def label_savings(summary: pd.DataFrame, tasks, default: str = DEFAULT_PROBE) -> dict:
    """Per task and baseline: the baseline's test score with every train label, and the smallest
    n at which the embedding curve reaches it (None: not within the sizes tried)."""
    out = {}
    for task in tasks:
        metric, higher = task.metric, task.higher_is_better
        curve = embedding_curve(summary, task, default)
        if not curve:
            continue
        n_all = curve[-1]["n"]
        res = {}
        for source in ("pixel_stats", "scratch"):
            if summary[(summary.task == task.name) & (summary.source == source)].empty:
                continue
            probe = "cnn" if source == "scratch" else (best_by_val(summary, task, source) or default)
            base, _ = _test_mean(summary, task.name, source, probe, metric)
            if not np.isfinite(base):
                continue
            reach = [c["n"] for c in curve if np.isfinite(c["mean"]) and (c["mean"] >= base if higher else c["mean"] <= base)]
            n = min(reach) if reach else None
            res[source] = {"baseline_probe": probe, "baseline_all": base, "n_all": n_all, "n_to_match": n,
                           "label_fraction": (n / n_all) if n else None}
        out[task.name] = res
    return out


def _mean_std(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f}" if not np.isfinite(std) or std == 0 else f"{mean:.3f} ± {std:.3f}"


def label_efficiency_table(summary: pd.DataFrame, tasks) -> pd.DataFrame:
    """The curves as a table: per task (of `tasks` that have curves), the test score of its
    primary metric (mean ± std over draws) at each n, for the embedding curve (best probe on val
    at each n) and each baseline's best probe on val (the CNN for scratch); columns n=25, ..., all."""
    rows = []
    for task in tasks:
        if summary[summary.task == task.name].empty:
            continue
        metric, higher = task.metric, task.higher_is_better
        lines = {"embeddings": {c["n"]: (c["mean"], c["std"]) for c in embedding_curve(summary, task)}}
        for source in ("pixel_stats", "scratch"):
            part = summary[(summary.task == task.name) & (summary.source == source)]
            if part.empty:
                continue
            probe = "cnn" if source == "scratch" else (best_by_val(summary, task, source) or DEFAULT_PROBE)
            lines[f"{source} ({probe})"] = {int(n): _test_mean(summary, task.name, source, probe, metric, int(n))
                                            for n in sorted(part.n.unique())}
        n_all = int(summary[summary.task == task.name].n.max())
        for source, curve in lines.items():
            row = {"task": task.name, "metric": f"{metric} ({'higher' if higher else 'lower'} is better)", "features": source}
            row.update({("all" if n == n_all else f"n={n}"): _mean_std(*v) for n, v in sorted(curve.items())})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(summary: pd.DataFrame, tasks, out_dir: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = {"embeddings": "-", "pixel_stats": "--", "scratch": ":"}
    for task in tasks:
        metric, higher = task.metric, task.higher_is_better
        s = summary[(summary.task == task.name) & (summary["split"] == "test") & (summary.metric == metric)]
        if s.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for (source, probe), part in s.groupby(["source", "probe"], sort=True):
            part = part.sort_values("n")
            line, = ax.plot(part.n, part["mean"], styles.get(source, "-"), marker="o", ms=3, label=f"{source}:{probe}")
            ax.fill_between(part.n, part["mean"] - part["std"], part["mean"] + part["std"], color=line.get_color(), alpha=0.12)
        ax.set_xscale("log")
        ticks = sorted(s.n.unique())
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled train chips (n)")
        ax.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{task.name} {title}".strip(), fontsize=10)
        if task.class_names and task.kind != "regression":
            names = ", ".join(task.class_names)
            ax.text(0.0, -0.28, f"classes: {names[:110] + ('…' if len(names) > 110 else '')}",
                    transform=ax.transAxes, fontsize=6, va="top")
        elif task.units:
            ax.text(0.0, -0.28, f"target: {task.source} ({task.units})", transform=ax.transAxes, fontsize=6, va="top")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / f"curve_{task.name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths

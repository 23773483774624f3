"""Progress bars for long work (rich), with throughput; silent when disabled or not a TTY."""

from __future__ import annotations

import time
from contextlib import contextmanager


class _Bar:
    def __init__(self, progress, task, unit: str):  # a rich Progress, or None when disabled
        self.progress, self.task, self.unit = progress, task, unit
        self.t0 = time.perf_counter()

    def advance(self, n: int = 1, **counts: int) -> None:
        if self.progress is None:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = "  ".join(f"{v} {k} ({v / elapsed:.1f}/s)" for k, v in counts.items())
        self.progress.update(self.task, advance=n, rate=rate)


@contextmanager
def progress_bar(label: str, total: int, completed: int = 0, enabled: bool = True, unit: str = "blocks"):
    if not enabled:
        yield _Bar(None, None, unit)
        return
    # rich only when a bar is shown: a unit runner or a pod's step does not pay its import
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[rate]}")]
    with Progress(*cols, transient=False) as progress:
        task = progress.add_task(label, total=total, completed=completed, rate="")
        yield _Bar(progress, task, unit)

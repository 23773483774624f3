"""What the benchmarks share: CPU seconds of this process and its waited-for children, commands run
as separate processes at once, and the projection to M3LEO scale printed beside the measured figures."""

from __future__ import annotations

import resource
import subprocess
import tempfile

M3LEO_CHIPS = 10_000_000  # about 10M chips of 448 px across six regions
M3LEO_CHIP_PX = 448
WORKERS = (16, 64, 256, 1024)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have
    been waited for (getrusage RUSAGE_SELF + RUSAGE_CHILDREN). Differences of two readings time a
    part; on a shared machine they are far steadier than wall time."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def m3leo_hours(cpu_s_per_chip: float, chip_px: int, workers=WORKERS) -> dict[str, float]:
    """Hours to process M3LEO's chips with N one-core workers, from a measured CPU cost per chip of
    `chip_px` pixels: the cost is scaled by pixels to 448 px chips (same bands) and assumed to divide
    evenly across workers (no plan or finalize step, no I/O limit). Keys "16_workers", ..."""
    per_chip = cpu_s_per_chip * (M3LEO_CHIP_PX / chip_px) ** 2
    return {f"{n}_workers": round(M3LEO_CHIPS * per_chip / n / 3600, 1) for n in workers}


def run_processes(commands: list[list[str]]) -> None:
    """Runs the commands as separate processes at once (pods: each its own interpreter, start-up
    included) and waits for all; a failure stops the benchmark with its stderr (each writes to its own
    file: a full pipe never holds one back)."""
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=log) for c, log in zip(commands, logs)]
    for c, p, log in zip(commands, procs, logs):
        if p.wait():
            log.seek(0)
            raise SystemExit(f"{' '.join(c)} failed ({p.returncode}): {log.read()[-2000:]}")

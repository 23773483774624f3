"""What bench_scale.py and bench_tile.py share: CPU seconds of this process and its waited-for
children, and the projection to M3LEO scale printed beside the measured figures."""

from __future__ import annotations

import resource

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

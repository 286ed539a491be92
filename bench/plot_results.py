"""tps and pooler CPU per transaction against client count, one line per target.

One row of two plots per workload. matplotlib is optional (`pip install -e '.[bench]'`):
without it `plot` says how to get it and the rest of the report is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pgbench_rounds import Rounds, Summary, summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# matplotlib's default cycle, by name, so that a target keeps its colour across subplots.
COLORS = [f"C{i}" for i in range(10)]
INSTALL_HINT = "install it with `.venv/bin/pip install -e '.[bench]'` (or `make bench`)"


def plot(rounds: Rounds, targets: Sequence[str], path: Path) -> str | None:
    """Write the PNG; returns why not when it cannot."""
    try:  # imported here: the rest of the bench runs without it
        import matplotlib as mpl

        mpl.use("Agg")  # no display here; render straight to the file
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot: matplotlib is not installed; {INSTALL_HINT}"
    workloads = rounds.workloads
    figure, axes = plt.subplots(
        len(workloads), 2, figsize=(11, 3.2 * len(workloads)), squeeze=False
    )
    for (tps_axis, cpu_axis), workload in zip(axes, workloads, strict=True):
        # One colour per target in every subplot (direct has no CPU line to shift them).
        for color, target in zip(COLORS, targets, strict=False):
            points = [(c, summary(rounds, workload.name, target, c)) for c in rounds.clients]
            good = [(c, s) for c, s in points if s.tps is not None]
            draw_tps(tps_axis, good, target, color)
            draw_cpu(cpu_axis, good, target, color)
        tps_axis.set_title(f"{workload.name}: tps (median, min-max)")
        cpu_axis.set_title(f"{workload.name}: pooler CPU s per 1000 tx")
        for axis in (tps_axis, cpu_axis):
            style(axis, rounds.clients)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def draw_tps(axis: Axes, points: Sequence[tuple[int, Summary]], target: str, color: str) -> None:
    """Median tps per client count, with the min-max of the rounds as error bars."""
    if not points:
        return
    tps = [s.tps or 0.0 for _, s in points]
    axis.errorbar(
        [c for c, _ in points],
        tps,
        yerr=[
            [t - min(s.tps_values) for t, (_, s) in zip(tps, points, strict=True)],
            [max(s.tps_values) - t for t, (_, s) in zip(tps, points, strict=True)],
        ],
        marker="o",
        capsize=3,
        label=target,
        color=color,
    )


def draw_cpu(axis: Axes, points: Sequence[tuple[int, Summary]], target: str, color: str) -> None:
    cpu = [(c, s.cpu) for c, s in points if s.cpu is not None]
    if cpu:
        axis.plot([c for c, _ in cpu], [v for _, v in cpu], marker="o", label=target, color=color)


def style(axis: Axes, clients: Sequence[int]) -> None:
    axis.set_xscale("log")
    axis.set_xticks(clients, [str(c) for c in clients])
    axis.minorticks_off()
    axis.set_xlabel("clients")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize="small")

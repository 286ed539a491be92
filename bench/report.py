"""Markdown pieces every section uses: number formats, ratios, tables, the report header.

Sections render their own tables with these helpers; `header` describes the machine and the
command so that a reader can judge and repeat the run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HOW_TO_READ = (
    "**How to read this.** The machine is shared and noisy, so absolute numbers drift from "
    "run to run; targets are measured side by side (interleaved, order rotated every "
    "block) and the ratios between them are what to compare. tps says how fast clients got "
    "served; pooler CPU per transaction says what the pooler itself spent to serve them, "
    "and holds up best on a busy machine: a ratio of 2 means pgproxy burns twice PgBouncer's "
    "CPU for the same work. Medians are over rounds, min-max shows the spread; a '—' is a "
    "target that did not run or failed (see the failures at the end)."
)


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "—"
    return f"{numerator / denominator:.2f}"


def median_of(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def spread(values: Sequence[float], digits: int = 0) -> str:
    """'min-max' of `values`, or '—' when there are none."""
    if not values:
        return "—"
    return f"{fmt(min(values), digits)}-{fmt(max(values), digits)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight)."""
    rule = "|".join("---" if a == "l" else "---:" for a in align)
    return [
        f"| {' | '.join(headers)} |",
        f"|{rule}|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]


# -- the machine -----------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def git_revision() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (" (uncommitted changes)" if git("status", "--porcelain") else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    """How this run was started, as one could type it again from the repository."""
    return shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv])


@dataclass(frozen=True, slots=True)
class Machine:
    """What the report header says about where and how the run happened."""

    started_at: dt.datetime
    load_at_start: str
    versions: dict[str, str]  # tool name → its --version line
    # Taken when the run starts: by the end, the run's own output files count as changes.
    revision: str = field(default_factory=lambda: git_revision())


def header(machine: Machine, title: str) -> list[str]:
    rows = [
        ["CPUs", f"{os.cpu_count()} x {cpu_model()}"],
        ["RAM", memory_gib()],
        ["kernel", f"{platform.system()} {platform.release()}"],
        ["Python", f"{platform.python_version()} ({platform.python_implementation()})"],
        *([name, version] for name, version in machine.versions.items()),
        ["load average at start", machine.load_at_start],
        ["load average at end", load_average()],
    ]
    return [
        f"# {title}",
        "",
        f"Run at {machine.started_at:%Y-%m-%d %H:%M} UTC on git {machine.revision}, took "
        f"{duration((dt.datetime.now(dt.UTC) - machine.started_at).total_seconds())}.",
        "",
        *table(["machine", ""], rows, "ll"),
        "Command:",
        "",
        "```",
        command_line(),
        "```",
        "",
        HOW_TO_READ,
        "",
    ]

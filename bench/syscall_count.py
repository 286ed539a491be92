"""System calls per transaction of each pooler, on a short pgbench run of its own.

A tracer is attached to the pooler's pid for exactly one pgbench run: `perf stat` counting
the `syscalls:sys_enter_*` tracepoints where perf works (in-kernel counting, a small
slowdown), otherwise `strace -c -f` (ptrace: every system call stops the pooler twice, so
it runs several times slower). Either way the traced run's tps says nothing about speed;
the count per transaction is the figure. A slowed event loop batches more work per wake-up,
so strace's counts of epoll_wait and friends come out lower than the untraced truth.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgbench_rounds import WORKLOADS, measure
from report import fmt, table
from targets import Target

# Give the tracer time to attach to every thread before pgbench starts.
ATTACH_SECONDS = 1.0
TOP = 5
_PERF_LINE = re.compile(r"^(\d+),[^,]*,syscalls:sys_enter_(\w+),")
# strace -c: "% time  seconds  usecs/call  calls  errors syscall"; errors may be blank.
_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


@dataclass
class SyscallCount:
    target: str
    tool: str
    clients: int
    tps: float = 0.0
    transactions: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def per_transaction(self) -> float | None:
        if not self.transactions or not self.counts:
            return None
        return sum(self.counts.values()) / self.transactions


def perf_works() -> bool:
    """Whether `perf stat` may count syscall tracepoints here (root or a lax paranoid)."""
    if shutil.which("perf") is None:
        return False
    result = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and "not supported" not in result.stderr


def pick_tool(choice: str) -> tuple[str | None, str]:
    """(tool, why): the tool to use for `choice` (auto, perf or strace), or None and why not."""
    if choice in ("auto", "perf") and perf_works():
        return "perf", "perf stat on the syscalls:sys_enter_* tracepoints"
    if choice in ("auto", "strace") and shutil.which("strace") is not None:
        return "strace", "strace -c -f"
    return None, f"no usable tool for --syscall-tool {choice} (install strace or perf)"


def tracer_command(tool: str, pid: int, output: Path) -> list[str]:
    if tool == "perf":
        return ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", str(pid),
                "-o", str(output)]  # fmt: skip
    return ["strace", "-c", "-f", "-p", str(pid), "-o", str(output)]


def parse_counts(tool: str, text: str) -> dict[str, int]:
    pattern = _PERF_LINE if tool == "perf" else _STRACE_LINE
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = pattern.match(line)
        if match and int(match.group(1)) > 0 and match.group(2) != "total":
            counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(1))
    return counts


def stop_tracer(tracer: subprocess.Popen[bytes]) -> None:
    """SIGINT makes both perf and strace detach and write their summary."""
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(timeout=30)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()


def count_syscalls(
    pgbench: str, target: Target, tool: str, clients: int, duration: int, workdir: Path
) -> SyscallCount:
    """One `pgbench -S` run against `target` with `tool` attached to its pid."""
    assert target.pid is not None
    result = SyscallCount(target.name, tool, clients)
    output = workdir / f"syscalls-{target.name}.txt"
    tracer = subprocess.Popen(
        tracer_command(tool, target.pid, output),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(ATTACH_SECONDS)
        if tracer.poll() is not None:
            stderr = tracer.stderr.read().decode(errors="replace") if tracer.stderr else ""
            result.error = f"{tool} exited at once: {stderr.strip()[-300:]}"
            return result
        run = measure(pgbench, target, WORKLOADS["select-simple"], clients, duration, scrape=False)
    finally:
        stop_tracer(tracer)
    result.tps, result.transactions, result.error = run.tps, run.transactions, run.error
    try:
        result.counts = parse_counts(tool, output.read_text(errors="replace"))
    except OSError as exc:
        result.error = f"{tool} wrote no summary: {exc}"
    if not result.counts and result.error is None:
        result.error = f"{tool} counted no system call"
    return result


def render(results: Sequence[SyscallCount], duration: int, note: str) -> list[str]:
    rows = []
    for r in results:
        per_tx = r.per_transaction
        top = sorted(r.counts.items(), key=lambda item: -item[1])[:TOP]
        rows.append(
            [
                r.target,
                r.tool,
                fmt(per_tx, 2),
                ", ".join(f"{name} {count / r.transactions:.2f}" for name, count in top)
                if per_tx is not None
                else "—",
                fmt(r.tps),
                r.error or "",
            ]
        )
    clients = results[0].clients if results else 0
    return [
        "## System calls per transaction",
        "",
        f"`pgbench -S -M simple -c {clients} -j 2 -T {duration}` against each pooler, with "
        f"{note} attached to the pooler's pid for the whole run (client logins included). "
        "The tracer slows the pooler: the tps of these runs is not comparable with the "
        "tables above, only the system calls per transaction are.",
        "",
        *table(
            [
                "pooler",
                "tool",
                "system calls / tx",
                f"top {TOP} by count (per tx)",
                "tps while traced",
                "error",
            ],
            rows,
            "llrlrl",
        ),
    ]

"""CPU time of Serve replicas and their child processes, read from /proc (Linux), for per-request cost.

Throughput ratios say how much slower a path is; CPU seconds per request say
where the cost sits. A gateway replica's cost includes every process it
started (an audit writer process, say), so a replica's whole process tree
counts; Ray's own daemons (raylet, GCS, the Serve controller) are shared by
every path and left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone since it was listed
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2:].split()


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_cpu_s(roots: Iterable[int], *, reaped: bool = False) -> float:
    """User plus system CPU seconds of the processes ``roots`` and all their descendants, so far;
    with ``reaped``, also of the children they already waited for (a server's finished backends)."""
    children = _children_by_parent()
    total, pending, seen = 0, list(roots), set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            if reaped:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime
        pending.extend(children.get(pid, ()))
    return total / _TICKS_PER_S


def cpu_meter(pids: Callable[[], list[int]]) -> Callable[[], float]:
    """A reading function for the load generator: CPU seconds of those processes' trees now."""
    return lambda: tree_cpu_s(pids())


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (not idle, not waiting on I/O), from /proc/stat.

    Beside a path's own processes this says whether the run was bound by the
    machine: on a small machine the load generator, Ray's daemons and both
    sides share the same cores, and a path whose processes leave CPU unused
    is waiting, not computing.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / _TICKS_PER_S


@dataclass(frozen=True)
class ThreadTimes:
    """One thread's time so far: on a CPU, and waiting for one while runnable (Linux schedstat, ns)."""

    name: str
    running_s: float
    runnable_s: float


def thread_times(pid: int) -> dict[int, ThreadTimes]:
    """Every thread of a process: its name and scheduler times, from /proc/<pid>/task (empty if gone).

    Over a window, a thread's running, runnable-waiting and remaining (idle:
    blocked on I/O, a lock or the GIL) shares say whether an event loop was
    the bottleneck or was waiting for something else.
    """
    found: dict[int, ThreadTimes] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            running_ns, runnable_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):  # gone since it was listed
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        found[int(tid)] = ThreadTimes(name, int(running_ns) / 1e9, int(runnable_ns) / 1e9)
    return found

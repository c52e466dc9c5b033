"""What `medserve bench` reads besides throughput: CPU per request from /proc, and a py-spy profile's self time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from medserve.bench.cpu import thread_times, tree_cpu_s
from medserve.bench.profile import top_self_frames


def test_tree_cpu_counts_a_grandchild_process_burning_cpu():
    # The root is a parent made for this test, so no other process of the suite can
    # join or leave its tree between two readings (pytest's own tree can: a Ray or
    # PostgreSQL child of an earlier test exiting took its CPU out of the total).
    burner = ("import time\nend = time.process_time() + 0.6\n"
              "while time.process_time() < end: pass\nimport sys; sys.stdin.read()")
    waiter = f"import subprocess, sys\nsys.exit(subprocess.run([sys.executable, '-c', {burner!r}]).returncode)"
    parent = subprocess.Popen([sys.executable, "-c", waiter], stdin=subprocess.PIPE)
    try:
        for _ in range(200):  # until the grandchild has burnt its CPU (10 s at most)
            if tree_cpu_s([parent.pid]) >= 0.5:
                break
            time.sleep(0.05)
        # Only the grandchild burns (the parent waits on it), so this CPU is the descendant's.
        assert tree_cpu_s([parent.pid]) >= 0.5
    finally:
        parent.communicate(b"")
    assert parent.returncode == 0
    assert tree_cpu_s([parent.pid]) == 0.0  # gone: nothing to read, no error


def test_thread_times_tell_a_busy_thread_from_a_blocked_one():
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    busy = threading.Thread(target=spin, name="ms-busy")
    blocked = threading.Thread(target=stop.wait, name="ms-blocked")
    busy.start()
    blocked.start()
    try:
        before = thread_times(os.getpid())
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:
            stop.wait(0.05)  # this thread blocks too: the spinner gets the GIL
        after = thread_times(os.getpid())
        wall = time.perf_counter() - started
    finally:
        stop.set()
        busy.join()
        blocked.join()
    busy_tid, blocked_tid = busy.native_id, blocked.native_id
    busy_after, blocked_after = after[busy_tid], after[blocked_tid]
    assert busy_after.name and blocked_after.name  # the kernel's thread names (comm)
    # On a CPU or queued for one most of the window, against almost never.
    busy_share = (busy_after.running_s + busy_after.runnable_s
                  - before[busy_tid].running_s - before[busy_tid].runnable_s) / wall
    assert busy_share > 0.6
    assert blocked_after.running_s - before[blocked_tid].running_s < 0.05
    assert thread_times(2**22 + 12345) == {}  # no such process: nothing, no error


def test_top_self_frames_groups_leaves_by_function_without_line_numbers():
    collapsed = "\n".join([
        "run (asyncio/events.py:84);handle (medserve/gateway/app.py:10);sha256_hex (medserve/audit_scope.py:40) 30",
        "run (asyncio/events.py:84);handle (medserve/gateway/app.py:12);sha256_hex (medserve/audit_scope.py:41) 10",
        "run (asyncio/events.py:84);select (selectors.py:468) 60",
        "garbage line",
    ])
    frames = top_self_frames(collapsed, count=5)
    assert frames == [("select (selectors.py)", 0.6), ("sha256_hex (medserve/audit_scope.py)", 0.4)]

"""Where the gateway replica's event loop spends a `medserve bench` run: computing, queued for a CPU, or idle.

Usage: python benchmarks/gateway_event_loop.py [--rounds R] [--duration S] [--concurrency C]
       [--durability strict|batched] [--no-raw-access-log]

Throughput ratios say how far the gateway is from raw Ray Serve; this says
why. It starts the same private Ray as `medserve bench` (direct ingress, raw
Ray Serve's no-op beside the gateway with the noop model in the gateway),
loads each side in turn, and reads from /proc, for each side's replica:

- its busiest thread (the event loop that runs the requests): the share of
  the window it ran, waited runnable for a CPU, and was idle (blocked: in
  epoll with nothing to do, or waiting for the GIL);
- CPU µs per request of that thread, of the replica's other threads, and of
  its child processes (the gateway's audit writer).

A side whose event loop runs nearly all the time is bound by its own work per
request; one that idles is waiting (for the audit commit, with strict
durability). Raw Ray Serve's loop runs 93-97% of the time under this load.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from medserve.bench.cpu import ThreadTimes, _children_by_parent, thread_times  # noqa: E402
from medserve.bench.loadgen import Request, measure  # noqa: E402
from medserve.bench.private import start_private_platform  # noqa: E402
from medserve.bench.raw_app import raw_application  # noqa: E402
from medserve.bench.runner import (  # noqa: E402
    GATEWAY_APP, NOOP_BODY, RAW_APP, RAW_ROUTE, _ready, _replica_pids, noop_spec,
)


def _snapshot(pid: int) -> tuple[dict[int, ThreadTimes], dict[int, float]]:
    """The replica's threads, and running seconds per thread of its child processes (one /proc read each)."""
    children = {tid: times.running_s
                for child in _children_by_parent().get(pid, [])
                for tid, times in thread_times(child).items()}
    return thread_times(pid), children


def _measure_side(label: str, url: list[str], request: Request, pid: int, concurrency: int,
                  duration_s: float) -> dict[str, float]:
    before, children_before = _snapshot(pid)
    started = time.perf_counter()
    result = measure(url, request, concurrency=concurrency, duration_s=duration_s, warmup_s=1.0)
    wall = time.perf_counter() - started
    after, children_after = _snapshot(pid)
    # The whole window (warm-up included) against the measured rate: the load is steady throughout.
    rate = result.requests / duration_s
    zero = ThreadTimes("", 0.0, 0.0)
    ran = {tid: times.running_s - before.get(tid, zero).running_s for tid, times in after.items()}
    loop_tid = max(ran, key=ran.__getitem__)
    running = ran[loop_tid] / wall
    runnable = (after[loop_tid].runnable_s - before.get(loop_tid, zero).runnable_s) / wall
    others = sum(value for tid, value in ran.items() if tid != loop_tid)
    children = sum(value - children_before.get(tid, 0.0) for tid, value in children_after.items())
    per_request = 1e6 / wall / rate if rate else float("nan")
    p50 = sorted(result.latencies_s)[len(result.latencies_s) // 2] * 1e3 if result.latencies_s else float("nan")
    row = {
        "rps": rate, "p50_ms": p50, "running": running, "runnable": runnable,
        "idle": max(0.0, 1.0 - running - runnable), "loop_us": ran[loop_tid] * per_request,
        "other_threads_us": others * per_request, "children_us": children * per_request,
    }
    print(f"{label:8} {rate:8.0f} {p50:8.2f} {running:8.0%} {runnable:9.0%} {row['idle']:6.0%} "
          f"{row['loop_us']:9.1f} {row['other_threads_us']:9.1f} {row['children_us']:9.1f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0, help="Seconds measured per side and round.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--durability", choices=["strict", "batched"], default="strict")
    parser.add_argument("--no-raw-access-log", dest="raw_access_log", action="store_false",
                        help="Raw Ray Serve without its access log, as the gateway runs.")
    options = parser.parse_args()

    print("starting a private Ray (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)", flush=True)
    platform = start_private_platform(throughput_optimized=True, ray_num_cpus=4, extra_apps=[
        raw_application(max_ongoing_requests=256, num_cpus=0.25, access_log=options.raw_access_log)])
    try:
        headers = {"Authorization": f"Bearer {platform.key}", "Content-Type": "image/png"}
        platform.apply([noop_spec("bench-noop", "gateway")], audit_durability=options.durability)
        raw_url, gateway_url, _ = _ready(platform, headers, 1)
        sides = {
            "raw": (raw_url, Request("POST", RAW_ROUTE, NOOP_BODY, {"Content-Type": "image/png"}),
                    _replica_pids(platform, RAW_APP)[0]),
            "gateway": (gateway_url, Request("POST", "/v1/imaging/bench-noop", NOOP_BODY, headers),
                        _replica_pids(platform, GATEWAY_APP)[0]),
        }
        print(f"concurrency {options.concurrency}, audit {options.durability}, {options.rounds} x "
              f"{options.duration:g} s per side; the event loop's shares of the window, CPU µs per request")
        print(f"{'side':8} {'req/s':>8} {'p50 ms':>8} {'running':>8} {'runnable':>9} {'idle':>6} "
              f"{'loop µs':>9} {'threads':>9} {'children':>9}")
        rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        for _ in range(options.rounds):
            for label, (url, request, pid) in sides.items():
                rows[label].append(_measure_side(label, url, request, pid, options.concurrency, options.duration))
        ratios = [gateway["rps"] / raw["rps"] for gateway, raw in zip(rows["gateway"], rows["raw"])]
        print("gateway / raw per round: " + ", ".join(f"{ratio:.3f}" for ratio in ratios))
        busy = sum(row["running"] for row in rows["gateway"]) / len(rows["gateway"])
        idle = sum(row["idle"] for row in rows["gateway"]) / len(rows["gateway"])
        print(f"the gateway's event loop ran {busy:.0%} of the time and idled {idle:.0%}")
    finally:
        platform.stop()


if __name__ == "__main__":
    main()

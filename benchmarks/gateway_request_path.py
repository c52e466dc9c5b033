"""medserve's own CPU per request on the hot imaging route, without Ray or a network (a benchmark, not a test).

Usage: python benchmarks/gateway_request_path.py [--requests N] [--concurrency C] [--durability strict|batched]
       [--profile]  (cProfile's top functions by own time)

The real gateway app (GatewayApp's fast path, GatewayState, audit scope, audit
writer, metrics) serves ``POST /v1/imaging/bench-noop`` with the built-in noop
engine loaded in the gateway, driven through ASGI calls in one event loop: what
is left is exactly the work medserve adds to each request inside a replica,
apart from Ray Serve's ingress and the HTTP server. It prints µs of process CPU
per request (the writer included) and requests per CPU-second.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from medserve import metrics  # noqa: E402
from medserve.bench.runner import noop_spec  # noqa: E402
from medserve.controlplane.render import catalog_entry  # noqa: E402
from medserve.db.engine import session_scope, upgrade  # noqa: E402
from medserve.gateway.app import create_app  # noqa: E402
from medserve.gateway.state import GatewayState, set_gateway  # noqa: E402
from medserve.security.api_keys import create_api_key  # noqa: E402

BODY = b"\x89PNG-bench-" + bytes(53)


async def _one(app, headers: list[tuple[bytes, bytes]]) -> int:  # type: ignore[no-untyped-def]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/imaging/bench-noop", "raw_path": b"/v1/imaging/bench-noop", "root_path": "",
             "query_string": b"", "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _drive(app, headers, requests: int, concurrency: int) -> dict[int, int]:  # type: ignore[no-untyped-def]
    statuses: dict[int, int] = {}
    remaining = iter(range(requests))

    async def worker() -> None:
        for _ in remaining:
            status = await _one(app, headers)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--durability", choices=["strict", "batched"], default="strict")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="medserve-path-"))
    url = f"sqlite:///{home / 'medserve.db'}"
    upgrade(url)
    with session_scope(url) as session:
        key = create_api_key(session, name="bench", role="clinical-app", rate_limit_rps=0)[1]
    entry = catalog_entry(noop_spec("bench-noop", "gateway")).model_dump(mode="json")
    # As in a replica: metrics aggregate in process (Ray's own export is replaced by nothing).
    metrics.use_backend(metrics.AggregatingBackend(metrics.NullBackend()))
    state = GatewayState([entry], {"home": str(home), "database_url": url, "audit_durability": args.durability})
    set_gateway(state)
    app = create_app()
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"image/png"),
               (b"content-length", str(len(BODY)).encode())]
    asyncio.run(_drive(app, headers, 500, args.concurrency))  # warm-up
    profiler = cProfile.Profile() if args.profile else None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    statuses = asyncio.run(_drive(app, headers, args.requests, args.concurrency))
    if profiler:
        profiler.disable()
    state.writer.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    state.close()
    set_gateway(None)
    print(f"{args.requests} requests ({statuses}), audit {args.durability}, concurrency {args.concurrency}: "
          f"{cpu / args.requests * 1e6:.1f} µs CPU per request (the replica's side; the writer process apart), "
          f"{args.requests / cpu:,.0f} requests per CPU-second, {args.requests / wall:,.0f}/s wall")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""A closed-loop HTTP/1.1 load generator: fixed concurrency, fixed duration.

Each of ``concurrency`` workers holds one keep-alive connection and sends the
next request as soon as the previous answer is read, so throughput and
latency are those of the server at that concurrency. Requests are prepared
bytes and answers are parsed only as far as Content-Length (or chunked
framing for streams): on a small machine the generator shares the cores with
the server, and a heavy client would understate the server more for the
faster path and distort the ratios the benchmark reports.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from medserve.bench.cpu import machine_busy_s


@dataclass(frozen=True)
class Request:
    """One prepared request; the body is sent as is."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(self.body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class LoadResult:
    """What one load run measured."""

    label: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    statuses: dict[int, int]
    latencies_s: list[float]
    units: int = 0  # e.g. completion tokens, when the caller counts them
    cpu_s: float | None = None  # CPU seconds the measured processes spent inside the window
    machine_cpu_s: float | None = None  # busy CPU seconds of the whole machine inside the window
    client_cpu_s: float | None = None  # CPU seconds of this load generator's process inside the window

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def units_per_s(self) -> float:
        return self.units / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index] * 1000

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")

    def summary(self) -> dict[str, object]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "units": self.units,
            "units_per_s": round(self.units_per_s, 2),
            "cpu_us_per_request": self._per_request_us(self.cpu_s),
            "machine_cpu_us_per_request": self._per_request_us(self.machine_cpu_s),
            "client_cpu_us_per_request": self._per_request_us(self.client_cpu_s),
        }

    def _per_request_us(self, seconds: float | None) -> float | None:
        return round(seconds / self.requests * 1e6, 1) if seconds is not None and self.requests else None


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection(host, port, limit=2**22)
        return cls(reader, writer)

    async def exchange(self, raw_request: bytes) -> Answer:
        self.writer.write(raw_request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            body = b"".join(chunks)
        else:
            body = await self.reader.read()
        return Answer(status, headers, body)

    def close(self) -> None:
        self.writer.close()


async def run_load(
    url: str | list[str],
    request: Request,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    label: str = "",
    count_units: Callable[[Answer], int] | None = None,
    cpu_of: Callable[[], float] | None = None,
) -> LoadResult:
    """Closed-loop load against ``url`` (scheme://host:port); only answers that
    finish inside the measured window count. Several URLs (the ingress
    replicas of one application) share the connections round robin, as a
    load balancer in front of them would."""
    targets = []
    for base in [url] if isinstance(url, str) else url:
        parts = urlsplit(base)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        targets.append((host, port, request.encode(f"{host}:{port}")))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counters = {"errors": 0, "units": 0}
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s

    async def worker(host: str, port: int, raw: bytes) -> None:
        connection = await Connection.open(host, port)
        try:
            while True:
                started = time.perf_counter()
                if started >= stop_at:
                    return
                try:
                    answer = await connection.exchange(raw)
                except (ConnectionError, asyncio.IncompleteReadError):
                    counters["errors"] += 1
                    connection.close()
                    connection = await Connection.open(host, port)
                    continue
                finished = time.perf_counter()
                if answer.headers.get("connection", "").lower() == "close":
                    connection.close()
                    connection = await Connection.open(host, port)
                if started >= measure_from and finished <= stop_at:
                    latencies.append(finished - started)
                    statuses[answer.status] = statuses.get(answer.status, 0) + 1
                    if answer.status >= 400:
                        counters["errors"] += 1
                    elif count_units is not None:
                        counters["units"] += count_units(answer)
        finally:
            connection.close()

    async def cpu_window() -> tuple[float | None, float, float]:
        """CPU seconds between the window's start and end: the measured processes, the machine, this client."""
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        start = await asyncio.to_thread(cpu_of) if cpu_of is not None else None
        machine_start, client_start = machine_busy_s(), time.process_time()
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        machine, client = machine_busy_s() - machine_start, time.process_time() - client_start
        measured = await asyncio.to_thread(cpu_of) - start if cpu_of is not None and start is not None else None
        return measured, machine, client

    cpu_task = asyncio.ensure_future(cpu_window())
    await asyncio.gather(*(worker(*targets[index % len(targets)]) for index in range(concurrency)))
    cpu_s, machine_cpu_s, client_cpu_s = await cpu_task
    return LoadResult(
        label=label,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(latencies),
        errors=counters["errors"],
        statuses=statuses,
        latencies_s=latencies,
        units=counters["units"],
        cpu_s=cpu_s,
        machine_cpu_s=machine_cpu_s,
        client_cpu_s=client_cpu_s,
    )


def json_request(path: str, payload: object, headers: dict[str, str] | None = None) -> Request:
    return Request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def measure(url: str, request: Request, **kwargs: object) -> LoadResult:
    """Synchronous wrapper; uvloop when installed (Ray Serve brings it), for a lighter client."""
    try:
        import uvloop

        return uvloop.run(run_load(url, request, **kwargs))  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(run_load(url, request, **kwargs))  # type: ignore[arg-type]

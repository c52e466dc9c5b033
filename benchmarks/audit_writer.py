"""Audited records per second the AuditWriter sustains into PostgreSQL and SQLite (a benchmark, not a test).

Usage: python benchmarks/audit_writer.py [--records N] [--concurrency C] [--durability strict|batched|both]
       [--database postgresql|sqlite|both] [--runs R] [--profile]

Producers are asyncio tasks calling ``writer.write(record, durable=...)`` the way the gateway's audit scope
does (strict: each waits for its commit); records are gateway-shaped (digests, pseudonyms, tokens) and
every one is linked into the keyed hash chain. PostgreSQL is a throwaway server started from the system's
binaries (tests/postgres.py); SQLite is a file in a temporary directory (WAL, synchronous=FULL).
After each run the chain is verified and the row count checked.

Besides the rate it prints the CPU each record cost, in µs: the producers' process (what a gateway replica
pays), the writer process (read from /proc after a warm-up record, so its start-up is not counted, until
every record is acknowledged) and the PostgreSQL server (its postmaster and backends, from /proc).
``--profile`` samples the writer process with py-spy during each run and prints the frames with the
most self time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from sqlalchemy import func, select  # noqa: E402

from medserve.audit.integrity import verify  # noqa: E402
from medserve.audit.writer import AuditWriter  # noqa: E402
from medserve.bench.cpu import tree_cpu_s  # noqa: E402
from medserve.bench.profile import top_self_frames  # noqa: E402
from medserve.db.engine import session_scope, upgrade  # noqa: E402
from medserve.db.models import AuditRecord, utcnow  # noqa: E402
from medserve.gateway.audit_scope import new_record_id  # noqa: E402

KEY = b"benchmark-signing-key"
TARGET = 10_000  # records/s, strict, each database (issue 14)


def _record(i: int) -> dict:
    digest = hashlib.sha256(str(i).encode()).hexdigest()
    return {
        "id": new_record_id(), "created_at": utcnow(), "api_key_id": "k3yid0000001", "caller_name": "ward app",
        "caller_role": "clinical-app", "department": "icu", "model_name": "smollm2-135m-instruct",
        "model_version": "1.0.0", "artifact_sha256": digest, "operation": "chat.completions", "outcome": "ok",
        "http_status": 200, "error_code": None, "latency_ms": 12.5, "input_sha256": digest, "output_sha256": digest,
        "prompt_tokens": 42, "completion_tokens": 64, "patient_pseudonym": digest, "encounter_pseudonym": digest,
        "clinician_pseudonym": None, "purpose_pseudonym": None,
    }


def _postgres_cpu(data_dir: Path | None) -> float:
    """CPU seconds of a PostgreSQL server: its postmaster, its backends, and the backends already gone."""
    if data_dir is None:
        return 0.0
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    return tree_cpu_s([postmaster], reaped=True)


class _Profile:
    """py-spy sampling one process; ``top`` gives the frames with the most self time."""

    def __init__(self, pid: int, path: Path) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.path = path
        self.process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--nonblocking",
             "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the load starts

    def top(self, count: int = 12) -> list[tuple[float, str]]:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)
        return [(100.0 * share, frame) for frame, share in top_self_frames(self.path.read_text(), count)]


def run(url: str, records: int, concurrency: int, durable: bool, batch_max: int, *,
        pg_data: Path | None = None, profile: Path | None = None) -> dict:
    writer = AuditWriter(url, signing_key=KEY, batch_max=batch_max, queue_max=50_000)
    payloads = [_record(i) for i in range(records)]

    async def producer(chunk: list[dict]) -> None:
        for record in chunk:
            await writer.write(record, durable=durable)

    async def main() -> None:
        await asyncio.gather(*(producer(payloads[i::concurrency]) for i in range(concurrency)))

    asyncio.run(writer.write(_record(-1), durable=True))  # warm-up: the writer process is up and connected
    pid = writer.process_id
    assert pid is not None
    profiler = _Profile(pid, profile) if profile is not None else None
    start, cpu_start = time.perf_counter(), time.process_time()
    writer_start, server_start = tree_cpu_s([pid]), _postgres_cpu(pg_data)
    asyncio.run(main())
    assert writer.flush(timeout=600)  # batched: the rate counts until everything is committed
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    writer_cpu, server_cpu = tree_cpu_s([pid]) - writer_start, _postgres_cpu(pg_data) - server_start
    assert writer.process_id == pid  # one writer process did it all
    top = profiler.top() if profiler is not None else []
    writer.close(timeout=600)
    with session_scope(url) as session:
        count = session.scalar(select(func.count()).select_from(AuditRecord))
    assert count == records + 1, (count, records + 1)
    result = verify(url, KEY)
    assert result.ok, result.problems[:3]
    per_record = 1e6 / records
    return {"rate": records / elapsed, "replica_us": cpu * per_record, "writer_us": writer_cpu * per_record,
            "server_us": server_cpu * per_record if pg_data is not None else None, "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=512, help="Concurrent in-flight requests.")
    parser.add_argument("--batch-max", type=int, default=500)
    parser.add_argument("--durability", choices=["strict", "batched", "both"], default="strict")
    parser.add_argument("--database", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--runs", type=int, default=2, help="Runs of each database and durability (fresh "
                        "database each); the machine may be shared, so the range is what to read.")
    parser.add_argument("--profile", action="store_true", help="Sample the writer process with py-spy.")
    args = parser.parse_args()
    from tests.postgres import TemporaryPostgres

    modes = ["strict", "batched"] if args.durability == "both" else [args.durability]
    print(f"{args.records} records, {args.concurrency} concurrent producers, batch_max {args.batch_max}, "
          f"{args.runs} run(s) each")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work shares the machine)")
    print(f"{'database':<12}{'durability':<12}{'records/s':>11}{'/ 10k':>7}{'CPU µs/record: replica':>24}"
          f"{'writer':>8}{'PG server':>11}")
    ranges: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    with TemporaryPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for name in ("postgresql", "sqlite") if args.database == "both" else (args.database,):
                for number in range(args.runs):
                    url = (pg.create_database() if name == "postgresql"
                           else f"sqlite:///{Path(tmp) / f'{mode}-{number}.db'}")
                    upgrade(url)
                    result = run(url, args.records, args.concurrency, mode == "strict", args.batch_max,
                                 pg_data=pg.data_dir if name == "postgresql" else None,
                                 profile=Path(tmp) / f"{name}-{mode}-{number}.txt" if args.profile else None)
                    ranges[(name, mode)].append(result)
                    server = "-" if result["server_us"] is None else f"{result['server_us']:.1f}"
                    print(f"{name:<12}{mode:<12}{result['rate']:>11,.0f}{result['rate'] / TARGET:>7.2f}"
                          f"{result['replica_us']:>24.1f}{result['writer_us']:>8.1f}{server:>11}", flush=True)
                    for share, frame in result["top"]:
                        print(f"    {share:5.1f}%  {frame}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    for (name, mode), results in ranges.items():
        rates = sorted(result["rate"] for result in results)
        writer = sorted(result["writer_us"] for result in results)
        print(f"{name} {mode}: {rates[0]:,.0f} - {rates[-1]:,.0f} records/s ({rates[0] / TARGET:.2f} - "
              f"{rates[-1] / TARGET:.2f} of 10k); writer {writer[0]:.1f} - {writer[-1]:.1f} µs/record")


if __name__ == "__main__":
    main()

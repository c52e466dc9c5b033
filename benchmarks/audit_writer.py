"""Audited records per second the AuditWriter sustains into PostgreSQL and SQLite (a benchmark, not a test).

Usage: python benchmarks/audit_writer.py [--records N] [--concurrency C] [--durability strict|batched]

Producers are asyncio tasks calling ``writer.write(record, durable=...)`` the way the gateway's audit scope
does (strict: each waits for its commit); records are gateway-shaped (digests, pseudonyms, tokens) and
every one is linked into the keyed hash chain. PostgreSQL is a throwaway server started from the system's
binaries (tests/postgres.py); SQLite is a file in a temporary directory (WAL, synchronous=FULL).
After each run the chain is verified and the row count checked.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
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
from medserve.db.engine import session_scope, upgrade  # noqa: E402
from medserve.db.models import AuditRecord, utcnow  # noqa: E402

KEY = b"benchmark-signing-key"


def _record(i: int) -> dict:
    digest = hashlib.sha256(str(i).encode()).hexdigest()
    return {
        "id": uuid.uuid4(), "created_at": utcnow(), "api_key_id": "k3yid0000001", "caller_name": "ward app",
        "caller_role": "clinical-app", "department": "icu", "model_name": "smollm2-135m-instruct",
        "model_version": "1.0.0", "artifact_sha256": digest, "operation": "chat.completions", "outcome": "ok",
        "http_status": 200, "error_code": None, "latency_ms": 12.5, "input_sha256": digest, "output_sha256": digest,
        "prompt_tokens": 42, "completion_tokens": 64, "patient_pseudonym": digest, "encounter_pseudonym": digest,
        "clinician_pseudonym": None, "purpose_pseudonym": None,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: the writer process after close()
    return usage.ru_utime + usage.ru_stime


def run(url: str, records: int, concurrency: int, durable: bool, batch_max: int) -> tuple[float, float, float]:
    """(records per wall-clock second, per CPU-second of this process (the replica), per CPU-second of the
    replica and its writer process together)."""
    writer = AuditWriter(url, signing_key=KEY, batch_max=batch_max, queue_max=50_000)
    payloads = [_record(i) for i in range(records)]

    async def producer(chunk: list[dict]) -> None:
        for record in chunk:
            await writer.write(record, durable=durable)

    async def main() -> None:
        await asyncio.gather(*(producer(payloads[i::concurrency]) for i in range(concurrency)))

    start, cpu_start, children_start = time.perf_counter(), time.process_time(), _children_cpu()
    asyncio.run(main())
    writer.close(timeout=600)  # batched: the rate counts until everything is committed
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    writer_cpu = _children_cpu() - children_start
    with session_scope(url) as session:
        count = session.scalar(select(func.count()).select_from(AuditRecord))
    assert count == records, (count, records)
    result = verify(url, KEY)
    assert result.ok, result.problems[:3]
    return records / elapsed, records / cpu, records / (cpu + writer_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=512, help="Concurrent in-flight requests.")
    parser.add_argument("--batch-max", type=int, default=500)
    parser.add_argument("--durability", choices=["strict", "batched", "both"], default="both")
    args = parser.parse_args()
    from tests.postgres import TemporaryPostgres

    modes = ["strict", "batched"] if args.durability == "both" else [args.durability]
    print(f"{args.records} records, {args.concurrency} concurrent producers, batch_max {args.batch_max}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work shares the machine)")
    print(f"{'database':<12}{'durability':<12}{'records/s':>12}{'per replica CPU-s':>19}{'per total CPU-s':>17}")
    with TemporaryPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for name in ("postgresql", "sqlite"):
                url = pg.create_database() if name == "postgresql" else f"sqlite:///{Path(tmp) / f'{mode}.db'}"
                upgrade(url)
                rate, cpu_rate, total_rate = run(url, args.records, args.concurrency, mode == "strict",
                                                 args.batch_max)
                print(f"{name:<12}{mode:<12}{rate:>12,.0f}{cpu_rate:>19,.0f}{total_rate:>17,.0f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}. 'per replica CPU-s': records per CPU-second of the "
          "producers' process (what the gateway replica pays); 'per total CPU-s' adds the writer process "
          "(the database server's own CPU not counted)")


if __name__ == "__main__":
    main()

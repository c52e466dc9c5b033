"""The batched audit writer: durable when asked, refuses to pretend when it cannot write."""

import asyncio
import uuid

import pytest
from sqlalchemy import func, select

from medserve.audit.writer import AuditWriter
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, utcnow
from medserve.errors import AuditUnavailableError


def _record(**overrides):
    record = {
        "id": uuid.uuid4(),
        "created_at": utcnow(),
        "operation": "imaging.analyze",
        "outcome": "ok",
        "http_status": 200,
        "latency_ms": 1.0,
    }
    record.update(overrides)
    return record


def _count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(AuditRecord))


def test_durable_write_is_committed_before_returning(database_url):
    writer = AuditWriter(database_url)
    try:
        asyncio.run(writer.write(_record(), durable=True))
        assert _count(database_url) == 1
    finally:
        writer.close()


def test_many_concurrent_writes_all_land_in_batches(database_url):
    writer = AuditWriter(database_url, batch_max=50)

    async def burst() -> None:
        await asyncio.gather(*(writer.write(_record(), durable=True) for _ in range(300)))

    try:
        asyncio.run(burst())
    finally:
        writer.close()
    assert _count(database_url) == 300


def test_close_drains_non_durable_records(database_url):
    writer = AuditWriter(database_url)

    async def fire_and_forget() -> None:
        for _ in range(25):
            await writer.write(_record(), durable=False)

    asyncio.run(fire_and_forget())
    writer.close()
    assert _count(database_url) == 25


def test_failed_durable_write_raises_audit_unavailable(tmp_path):
    # A database with no schema: every insert fails.
    writer = AuditWriter(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(AuditUnavailableError):
            asyncio.run(writer.write(_record(), durable=True))
    finally:
        writer.close()

"""What the audit table holds, for tests that count rows against answered requests."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord


def audit_ids(url: str) -> set[uuid.UUID]:
    with session_scope(url) as session:
        return set(session.scalars(select(AuditRecord.id)))


def audit_count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(AuditRecord))

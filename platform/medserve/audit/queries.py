"""Reading the audit trail back (CLI, the admin API, exports)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord

PUBLIC_FIELDS = [column.name for column in AuditRecord.__table__.columns]


def record_to_dict(record: AuditRecord) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in PUBLIC_FIELDS:
        value = getattr(record, name)
        result[name] = value.isoformat() if hasattr(value, "isoformat") else (str(value) if name == "id" else value)
    return result


def list_records(database_url: str, *, limit: int = 50, model: str | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    with session_scope(database_url) as session:
        query = select(AuditRecord).order_by(AuditRecord.created_at.desc()).limit(limit)
        if model:
            query = query.where(AuditRecord.model_name == model)
        return [record_to_dict(row) for row in session.scalars(query)]


@dataclass(frozen=True)
class AuditFilter:
    """What an auditor asks for; every field optional. ``department`` is set by the server, not the caller."""

    model: str | None = None
    version: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    patient_pseudonym: str | None = None
    department: str | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.model:
            query = query.where(AuditRecord.model_name == self.model)
        if self.version:
            query = query.where(AuditRecord.model_version == self.version)
        if self.outcome:
            query = query.where(AuditRecord.outcome == self.outcome)
        if self.since:
            query = query.where(AuditRecord.created_at >= self.since)
        if self.until:
            query = query.where(AuditRecord.created_at < self.until)
        if self.patient_pseudonym:
            query = query.where(AuditRecord.patient_pseudonym == self.patient_pseudonym)
        if self.department:
            query = query.where(AuditRecord.department == self.department)
        return query


def search_records(
    database_url: str, where: AuditFilter, *, limit: int = 100, offset: int = 0, oldest_first: bool = False
) -> list[dict[str, Any]]:
    """One page of matching records (newest first unless asked), as plain dicts with native types."""
    order = (AuditRecord.created_at.asc(), AuditRecord.id.asc()) if oldest_first else (
        AuditRecord.created_at.desc(), AuditRecord.id.desc())
    query = where.apply(select(AuditRecord.__table__)).order_by(*order).offset(offset).limit(limit)
    with session_scope(database_url) as session:
        return [dict(row._mapping) for row in session.execute(query)]

"""Reading the audit trail back (CLI and, later, the admin API)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

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

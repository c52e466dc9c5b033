"""GET /admin/audit: the audit trail for auditors and admins, filtered and paginated.

A patient is searched by clear id (query parameter ``patient``); the gateway
turns it into the keyed pseudonym the table holds, so the clear id is never
stored nor compared in the database. A department-bound key sees only its
department's rows.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from medserve.audit.queries import AuditFilter, search_records
from medserve.errors import RequestValidationFailed
from medserve.gateway.answers import AuditPage, ok
from medserve.gateway.openapi import AUTHENTICATED, QUERY, error_responses
from medserve.gateway.state import GatewayState, get_gateway
from medserve.security.pseudonyms import pseudonymize

router = APIRouter(tags=["audit"])

# The largest offset both databases take (SQLite and PostgreSQL offsets are 64-bit; a larger one was a 500).
MAX_OFFSET = 2**53 - 1


def _json_value(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# RFC 3339 date-time, what the document's "format: date-time" promises: a zone is required.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _time(name: str, value: str | None) -> datetime | None:
    """A query time as the document states it (RFC 3339 with zone), else 400 naming the parameter."""
    if value is None:
        return None
    try:
        if not _RFC3339.match(value):
            raise ValueError(name)
        return datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        message = "times are RFC 3339 with a zone, e.g. 2026-01-01T00:00:00Z"
        raise RequestValidationFailed(message, fields=[name]) from None


@router.get("/admin/audit", response_model=None, responses={**ok(AuditPage), **error_responses(AUTHENTICATED, QUERY)})
async def list_audit(
    request: Request,
    model: str | None = Query(None, max_length=100, description="Model name."),
    version: str | None = Query(None, max_length=64, description="Model version."),
    outcome: Literal["ok", "denied", "error", "cancelled"] | None = Query(None, description="Outcome."),
    since: str | None = Query(None, description="Records at or after this time (RFC 3339, with zone).",
                              json_schema_extra={"format": "date-time"}),
    until: str | None = Query(None, description="Records before this time (RFC 3339, with zone).",
                              json_schema_extra={"format": "date-time"}),
    patient: str | None = Query(None, max_length=200, description="Clear patient id; pseudonymised server-side."),
    limit: int = Query(100, ge=1, le=1000, description="Page size."),
    offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Rows to skip (newest first)."),
    gateway: GatewayState = Depends(get_gateway),
) -> dict[str, Any]:
    principal = await gateway.principal(request)
    where = AuditFilter(
        model=model,
        version=version,
        outcome=outcome,
        since=_time("since", since),
        until=_time("until", until),
        patient_pseudonym=pseudonymize(gateway.recorder.pseudonym_key, "patient", patient) if patient else None,
        department=principal.department,
    )
    rows = await asyncio.to_thread(search_records, gateway.database_url, where, limit=limit + 1, offset=offset)
    more = len(rows) > limit
    return {
        "data": [{k: _json_value(v) for k, v in row.items()} for row in rows[:limit]],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if more else None,
    }

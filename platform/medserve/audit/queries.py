"""Reading the audit trail back (CLI, the admin API, exports)."""

from __future__ import annotations

from dataclasses import dataclass
import uuid
from collections import defaultdict
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
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        result[name] = value
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


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


def compare_versions(database_url: str, model: str, *, since: datetime | None = None) -> dict[str, Any]:
    """A canary or shadow comparison from the audit trail alone.

    Per version and arm: requests, error rate (denied requests never reached a
    version and are left out), latency percentiles, top-label counts. For a
    shadow: each shadow record is paired with the answered record it mirrored
    (``shadow_of``), giving label and output agreement on the same inputs.
    """
    with session_scope(database_url) as session:
        query = select(AuditRecord).where(
            AuditRecord.model_name == model, AuditRecord.rollout.is_not(None), AuditRecord.outcome != "denied"
        )
        if since is not None:
            query = query.where(AuditRecord.created_at >= since)
        rows = list(session.scalars(query))
    arms: dict[tuple[str | None, str], list[AuditRecord]] = defaultdict(list)
    for row in rows:
        arms[(row.model_version, row.rollout or "")].append(row)
    versions = []
    for (version, arm), group in sorted(arms.items(), key=lambda item: (item[0][1], item[0][0] or "")):
        latencies = [r.latency_ms for r in group if r.outcome == "ok"]
        errors = sum(1 for r in group if r.outcome != "ok")
        labels: dict[str, int] = defaultdict(int)
        for r in group:
            if r.output_label:
                labels[r.output_label] += 1
        versions.append({
            "version": version,
            "arm": arm,
            "requests": len(group),
            "errors": errors,
            "error_rate": round(errors / len(group), 4) if group else None,
            "latency_ms_p50": _percentile(latencies, 0.5),
            "latency_ms_p95": _percentile(latencies, 0.95),
            "labels": dict(sorted(labels.items())),
        })
    answered = {r.id: r for r in rows if not r.shadow}
    pairs = [(answered[r.shadow_of], r) for r in rows if r.shadow and r.shadow_of in answered]
    ok_pairs = [(a, s) for a, s in pairs if a.outcome == "ok" and s.outcome == "ok"]
    labelled = [(a, s) for a, s in ok_pairs if a.output_label and s.output_label]
    shadow = {
        "pairs": len(pairs),
        "both_ok": len(ok_pairs),
        "label_agreement": round(sum(a.output_label == s.output_label for a, s in labelled) / len(labelled), 4)
        if labelled else None,
        "output_agreement": round(sum(a.output_sha256 == s.output_sha256 for a, s in ok_pairs) / len(ok_pairs), 4)
        if ok_pairs else None,
    }
    return {"model": model, "since": since.isoformat() if since else None, "versions": versions, "shadow": shadow}

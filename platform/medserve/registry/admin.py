"""Registry operations as plain data, shared by the CLI and the admin API."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from medserve.audit.queries import compare_versions
from medserve.db.engine import session_scope
from medserve.db.models import Model, ModelAlias, ModelVersion, Rollout, utcnow
from medserve.registry import lifecycle
from medserve.registry.service import register_version
from medserve.specs import DeploymentSpec


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def version_dict(row: ModelVersion) -> dict[str, Any]:
    return {
        "model": row.model.name,
        "version": row.version,
        "status": row.status,
        "engine": row.engine,
        "artifact_uri": row.artifact_uri,
        "artifact_sha256": row.artifact_sha256,
        "registered_by": row.registered_by,
        "registered_at": _iso(row.created_at),
        "approved_by": row.approved_by,
        "approved_at": _iso(row.approved_at),
        "status_changed_by": row.status_changed_by,
        "status_changed_at": _iso(row.status_changed_at),
        "model_card": row.model_card,
    }


def list_models(database_url: str) -> list[dict[str, Any]]:
    with session_scope(database_url) as session:
        result = []
        for model in session.scalars(select(Model).order_by(Model.name)):
            aliases = session.scalars(select(ModelAlias).where(ModelAlias.model_id == model.id).order_by(ModelAlias.name))
            rollout = lifecycle.get_rollout(session, model)
            result.append({
                "name": model.name,
                "task": model.task,
                "versions": len(model.versions),
                "aliases": [
                    {"name": a.name, "version": a.version.version,
                     "previous": a.previous_version.version if a.previous_version else None}
                    for a in aliases
                ],
                "rollout": None if rollout is None else {
                    "mode": rollout.mode, "candidate": rollout.candidate.version, "percent": rollout.percent,
                    "started_by": rollout.started_by, "started_at": _iso(rollout.started_at),
                },
            })
        return result


def list_versions(database_url: str, model_name: str) -> list[dict[str, Any]]:
    with session_scope(database_url) as session:
        model = lifecycle.get_model(session, model_name)
        return [version_dict(row) for row in model.versions]


def register_from_spec(database_url: str, spec: DeploymentSpec, by: str) -> dict[str, Any]:
    with session_scope(database_url) as session:
        return version_dict(register_version(session, spec, by))


def change_status(database_url: str, model: str, version: str, status: str, by: str) -> dict[str, Any]:
    with session_scope(database_url) as session:
        return version_dict(lifecycle.set_status(session, model, version, status, by))


def point_alias(database_url: str, model: str, alias: str, version: str, by: str) -> None:
    with session_scope(database_url) as session:
        lifecycle.set_alias(session, model, alias, version, by)


def model_history(database_url: str, model_name: str) -> list[dict[str, Any]]:
    with session_scope(database_url) as session:
        return [
            {"at": _iso(e.created_at), "action": e.action, "version": e.version, "actor": e.actor, "details": e.details}
            for e in lifecycle.history(session, model_name)
        ]


def comparison_report(database_url: str, model: str, since_minutes: float | None = None) -> dict[str, Any]:
    """Compare versions since ``since_minutes`` ago, else since the current rollout began."""
    since = None
    if since_minutes is not None:
        since = utcnow() - timedelta(minutes=since_minutes)
    else:
        with session_scope(database_url) as session:
            rollout = session.scalar(
                select(Rollout).join(Model, Rollout.model_id == Model.id).where(Model.name == model)
            )
            since = rollout.started_at if rollout is not None else None
    return compare_versions(database_url, model, since=since)

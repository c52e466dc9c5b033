"""Record specs in the registry: models, versions (immutable), deployments."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from medserve.db.models import Deployment, Model, ModelEvent, ModelVersion
from medserve.errors import VersionConflictError
from medserve.specs import DeploymentSpec


def spec_digest(spec: DeploymentSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def register_version(session: Session, spec: DeploymentSpec, registered_by: str) -> ModelVersion:
    """The registry row for the spec's model version, created on first sight.

    The same name and version must always mean the same artifact: an audit
    record that names a version must identify exactly one set of weights.
    """
    model_spec = spec.model
    model = session.scalar(select(Model).where(Model.name == model_spec.name))
    if model is None:
        model = Model(name=model_spec.name, task=model_spec.task)
        session.add(model)
        session.flush()
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == model_spec.version)
    )
    if version is None:
        version = ModelVersion(
            model_id=model.id,
            version=model_spec.version,
            engine=model_spec.engine,
            artifact_uri=model_spec.artifact.uri,
            artifact_sha256=model_spec.artifact.sha256,
            model_card=spec.model_card.model_dump(mode="json"),
            registered_by=registered_by,
            spec=spec.model_dump(mode="json"),
        )
        session.add(version)
        session.flush()
        session.add(ModelEvent(model_id=model.id, version=version.version, action="registered", actor=registered_by,
                               details={"artifact_sha256": version.artifact_sha256}))
    elif version.artifact_sha256 != model_spec.artifact.sha256 or version.artifact_uri != model_spec.artifact.uri:
        raise VersionConflictError(model=model_spec.name, version=model_spec.version)
    elif version.spec is None:
        version.spec = spec.model_dump(mode="json")
    return version


def record_deployment(
    session: Session, spec: DeploymentSpec, version: ModelVersion, state: str, reason: str | None = None
) -> Deployment:
    row = session.scalar(select(Deployment).where(Deployment.name == spec.name))
    if row is None:
        row = Deployment(name=spec.name, model_version_id=version.id, spec={}, spec_sha256="", state=state)
        session.add(row)
    row.model_version_id = version.id
    row.spec = spec.model_dump(mode="json")
    row.spec_sha256 = spec_digest(spec)
    row.state = state
    row.state_reason = reason
    session.flush()
    return row


def mark_removed(session: Session, keep: set[str]) -> list[str]:
    """Deployments no longer in the catalog are marked removed; returns their names."""
    removed = []
    for row in session.scalars(select(Deployment).where(Deployment.state != "removed")):
        if row.name not in keep:
            row.state = "removed"
            row.state_reason = "no longer in the catalog"
            removed.append(row.name)
    return removed

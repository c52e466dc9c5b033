"""SQLAlchemy 2.0 models for the registry, the API keys and the audit trail.

A naming convention names every index and constraint, so Alembic migrations
diff cleanly and run the same on SQLite and PostgreSQL. Times are stored in
UTC; keys are UUIDs generated in Python so a record's id is known before it
reaches the database (the gateway returns it to the caller as inference_id).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, Uuid

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware in UTC.

    SQLite keeps no zone; PostgreSQL does. Normalising here means callers can
    compare times from either database without surprises.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use timezone-aware UTC")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), uuid.UUID: Uuid(), dict[str, Any]: JSON()}


class ApiKey(Base):
    """A credential for a person or an application. Only a hash of the secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Public, non-secret part of the key (shown in audit rows and listings).
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    department: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Model(Base):
    """A model known to the registry, independent of its versions."""

    __tablename__ = "models"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    task: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list["ModelVersion"]] = relationship(back_populates="model", order_by="ModelVersion.created_at")


class ModelVersion(Base):
    """One version of a model: its artifact, digest, engine and model card."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(32))
    artifact_uri: Mapped[str] = mapped_column(Text)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    model_card: Mapped[dict[str, Any]]
    # registered -> validated -> approved -> retired
    status: Mapped[str] = mapped_column(String(16), default="registered")
    registered_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    approved_by: Mapped[str | None] = mapped_column(String(200))
    approved_at: Mapped[datetime | None]

    model: Mapped[Model] = relationship(back_populates="versions")


class Deployment(Base):
    """The spec last applied under a deployment name, and what happened to it."""

    __tablename__ = "deployments"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"), index=True)
    spec: Mapped[dict[str, Any]]
    spec_sha256: Mapped[str] = mapped_column(String(64))
    # applied | skipped | removed
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    model_version: Mapped[ModelVersion] = relationship()


class AuditRecord(Base):
    """One inference request that reached the gateway, answered or refused.

    Holds digests, never payloads. Clinical context is stored only as keyed
    HMAC pseudonyms, so the table alone cannot re-identify a patient.
    """

    __tablename__ = "audit_records"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    caller_name: Mapped[str | None] = mapped_column(String(200))
    caller_role: Mapped[str | None] = mapped_column(String(32))
    department: Mapped[str | None] = mapped_column(String(100))
    model_name: Mapped[str | None] = mapped_column(String(100), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(32))
    # ok | denied | error | cancelled
    outcome: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # LLM calls: digest of the reasoning part (kept apart from the answer's
    # output_sha256), time to the first generated token, and why generation
    # ended (stop | length | cancelled).
    reasoning_sha256: Mapped[str | None] = mapped_column(String(64))
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    encounter_pseudonym: Mapped[str | None] = mapped_column(String(64))
    clinician_pseudonym: Mapped[str | None] = mapped_column(String(64))
    purpose_pseudonym: Mapped[str | None] = mapped_column(String(64))

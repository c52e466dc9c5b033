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

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
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
    # Requests per second this key may make; NULL: the install's default
    # (MEDSERVE_RATE_LIMIT_KEY_RPS), 0: no limit (e.g. a benchmark key).
    rate_limit_rps: Mapped[float | None] = mapped_column(Float)


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
    # The whole deployment spec the version was registered with (resources,
    # inputs, engine parameters), so the control plane can deploy any
    # registered version, not only the one a catalog file names today.
    spec: Mapped[dict[str, Any] | None]
    status_changed_by: Mapped[str | None] = mapped_column(String(200))
    status_changed_at: Mapped[datetime | None]

    model: Mapped[Model] = relationship(back_populates="versions")


class ModelAlias(Base):
    """A named pointer to one version of a model (``production``, ``staging``, ...).

    ``previous_version_id`` is what the alias pointed to before its last move:
    ``medserve rollback`` moves it back there in one step.
    """

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    previous_version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("model_versions.id"))
    updated_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    version: Mapped[ModelVersion] = relationship(foreign_keys=[model_version_id])
    previous_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[previous_version_id])


class Rollout(Base):
    """A candidate version taking part of a model's traffic: at most one per model.

    mode ``canary``: ``percent`` of requests (sticky per patient pseudonym) are
    answered by the candidate. mode ``shadow``: every request is mirrored to
    the candidate, whose answer is audited and never returned.
    """

    __tablename__ = "rollouts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), unique=True)
    mode: Mapped[str] = mapped_column(String(16))
    candidate_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    started_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)

    candidate: Mapped[ModelVersion] = relationship()


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


class ModelEvent(Base):
    """Append-only history of registry decisions: registration, status changes,
    alias moves, rollouts started, promoted and rolled back, and by whom."""

    __tablename__ = "model_events"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[str | None] = mapped_column(String(64))
    # registered | validated | approved | retired | alias | canary | shadow | promote | rollback
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditRecord(Base):
    """One inference request that reached the gateway, answered or refused.

    Holds digests, never payloads. Clinical context is stored only as keyed
    HMAC pseudonyms, so the table alone cannot re-identify a patient.

    Tamper evidence: each writer keeps one hash chain (``chain_id``); record
    ``seq`` of a chain carries ``prev_hash`` (the record_hash of seq - 1) and
    ``record_hash``, a keyed HMAC-SHA256 over its canonical content including
    prev_hash (see :mod:`medserve.audit.chain`).
    """

    __tablename__ = "audit_records"
    __table_args__ = (UniqueConstraint("chain_id", "seq"),)

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
    # Rollouts: which arm answered (primary | canary | shadow; null outside a
    # rollout). A shadow record is a mirrored call whose answer was never
    # returned; shadow_of is the id of the record of the answer that was.
    rollout: Mapped[str | None] = mapped_column(String(16))
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    shadow_of: Mapped[uuid.UUID | None] = mapped_column(index=True)
    # Top label of a classifier's answer (one of the model's class names,
    # never free text): what version comparisons count agreement on.
    output_label: Mapped[str | None] = mapped_column(String(64))
    # Nullable only so rows written before the chain existed survive the
    # migration; `medserve audit verify` reports any row outside a chain.
    chain_id: Mapped[str | None] = mapped_column(String(36))
    seq: Mapped[int | None] = mapped_column(BigInteger)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    record_hash: Mapped[str | None] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement: chain ``chain_id`` reached ``seq`` with ``record_hash``.

    kind: ``open`` (a chain starts; seq 0), ``periodic``, ``close`` (a writer
    drained), ``anchor`` (older records were pruned: the chain now starts after
    seq). The signature is an HMAC-SHA256 under the audit signing key, so a
    checkpoint cannot be forged or moved without the key.
    """

    __tablename__ = "audit_checkpoints"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    chain_id: Mapped[str] = mapped_column(String(36), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    record_hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    signature: Mapped[str] = mapped_column(String(64))


class Review(Base):
    """A clinician's sign-off of one AI result (one audit record): accept, edit or reject.

    One per result: a sign-off is part of the clinical record and is not
    overwritten. Model name and version are copied from the audit record so
    override rates per model version need no join.
    """

    __tablename__ = "reviews"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    inference_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("audit_records.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    model_name: Mapped[str | None] = mapped_column(String(100), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    # accept | edit | reject
    decision: Mapped[str] = mapped_column(String(16))
    # The clinician's corrected finding (edit only).
    corrected_finding: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    comment: Mapped[str | None] = mapped_column(Text)
    # LLM answers: the clinician's text (edit only), kept beside the original,
    # and the digest of the original answer the decision was made on (the
    # audit record's output_sha256).
    edited_text: Mapped[str | None] = mapped_column(Text)
    original_sha256: Mapped[str | None] = mapped_column(String(64))
    reviewer_key_id: Mapped[str] = mapped_column(String(32))
    reviewer_name: Mapped[str] = mapped_column(String(200))
    reviewer_role: Mapped[str] = mapped_column(String(32))
    # HMAC pseudonym of X-Clinician-Id, when the reviewing app sends it.
    clinician_pseudonym: Mapped[str | None] = mapped_column(String(64))
    # Where the decision was made: api (POST /v1/reviews) or console (the browser console); for the
    # console, the sign-in session (console_sessions.id, never its secret) and the audit record of the
    # decision (operation review.decision).
    via: Mapped[str | None] = mapped_column(String(16))
    session_id: Mapped[uuid.UUID | None]
    audit_id: Mapped[uuid.UUID | None]


class StoredResult(Base):
    """What is kept of one AI result beyond its audit record, so it can be reviewed and fetched again.

    ``id`` is the audit record's id (the inference id or report id the caller
    got). No foreign key: the audit writer process may commit (or spool) the
    audit row after this one; readers join on the id. Written only for what a
    spec's review policy asks: a review-required LLM answer (the pending
    result), an imaging result with ``store_output``, every pipeline report.
    Texts and documents are pruned after ``expires_at``; the row, its digest
    and the review stay.
    """

    __tablename__ = "stored_results"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    # The audit record's operation: chat.completions | completions | imaging.analyze | pipeline.run
    operation: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(100), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    # The caller's department: whose clinicians may see and sign off the result.
    department: Mapped[str | None] = mapped_column(String(100), index=True)
    review_required: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # sha256 of the answer text / findings as given (the audit record's output_sha256).
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    output_text: Mapped[str | None] = mapped_column(Text)
    input_text: Mapped[str | None] = mapped_column(Text)
    # Pipeline reports: the JSON report and its FHIR DiagnosticReport as answered; imaging findings.
    document: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    pruned_at: Mapped[datetime | None]


class ConsoleSession(Base):
    """A clinician's or auditor's sign-in to the review console.

    Only the sha256 of the session secret (the cookie's value) is stored: a copy of this table does not
    let anyone act as the user. ``id`` is a public reference (reviews and logs name it). The session ends at
    ``expires_at`` (absolute), after ``MEDSERVE_CONSOLE_SESSION_IDLE_MINUTES`` without a request, or at logout
    (the row is deleted).
    """

    __tablename__ = "console_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    # How the user signed in: api_key | oidc.
    method: Mapped[str] = mapped_column(String(16))
    # The principal as signed in: the API key's id, or the identity provider's subject.
    key_id: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    department: Mapped[str | None] = mapped_column(String(100))

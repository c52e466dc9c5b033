"""Migrations, keys and the registry on the embedded SQLite database."""

import hashlib
from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from medserve.db.engine import alembic_config, get_engine, session_scope
from medserve.db.models import Base, Deployment, ModelVersion, utcnow
from medserve.errors import AuthenticationError, BadRequestError, VersionConflictError
from medserve.registry.service import record_deployment, register_version
from medserve.security.api_keys import create_api_key, verify_api_key
from medserve.security.roles import Role
from medserve.specs import load_catalog


def test_migrations_match_the_models(database_url):
    with get_engine(database_url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_downgrade_and_upgrade_again(database_url):
    config = alembic_config(database_url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")


def test_key_is_shown_once_and_stored_hashed(database_url):
    with session_scope(database_url) as session:
        row, plaintext = create_api_key(session, name="ward app", role="clinical-app", department="icu")
        stored = [str(getattr(row, column.name)) for column in row.__table__.columns]
    secret = plaintext.split("_")[2]
    assert not any(secret in value for value in stored)
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    with session_scope(database_url) as session:
        principal = verify_api_key(session, plaintext)
    assert principal.role is Role.CLINICAL_APP
    assert principal.department == "icu"


@pytest.mark.parametrize("presented", ["", "msk_", "Bearer x", "msk_abc_def", "msk_a_b_c"])
def test_malformed_or_unknown_keys_are_refused(database_url, presented):
    with session_scope(database_url) as session, pytest.raises(AuthenticationError):
        verify_api_key(session, presented)


def test_wrong_secret_expired_and_revoked_keys_are_refused(database_url):
    with session_scope(database_url) as session:
        row, plaintext = create_api_key(session, name="app", role="clinician")
        _, expiring = create_api_key(session, name="old", role="clinician", expires_at=utcnow() - timedelta(seconds=1))
        key_id = row.key_id
    with session_scope(database_url) as session, pytest.raises(AuthenticationError):
        verify_api_key(session, f"msk_{key_id}_wrongsecret")
    with session_scope(database_url) as session, pytest.raises(AuthenticationError):
        verify_api_key(session, expiring)
    with session_scope(database_url) as session:
        session.scalars(select(type(row)).where(type(row).key_id == key_id)).one().revoked_at = utcnow()
    with session_scope(database_url) as session, pytest.raises(AuthenticationError):
        verify_api_key(session, plaintext)


def test_unknown_role_is_a_bad_request(database_url):
    with session_scope(database_url) as session, pytest.raises(BadRequestError):
        create_api_key(session, name="x", role="superuser")


def test_registry_records_versions_immutably(database_url, repo_root):
    spec = next(s for s in load_catalog(repo_root / "deployments") if s.name == "brain-mri-tumour")
    with session_scope(database_url) as session:
        version = register_version(session, spec, "test")
        record_deployment(session, spec, version, "applied")
    with session_scope(database_url) as session:
        again = register_version(session, spec, "test")
        assert session.scalars(select(ModelVersion)).all() == [again]
        assert session.scalar(select(Deployment)).state == "applied"

    altered = spec.model_copy(
        update={"model": spec.model.model_copy(update={"artifact": spec.model.artifact.model_copy(update={"sha256": "0" * 64})})}
    )
    with session_scope(database_url) as session, pytest.raises(VersionConflictError):
        register_version(session, altered, "test")

"""Tamper evidence: `medserve audit verify` names the first changed, removed or inserted record; prune keeps
the rest verifiable; the FHIR export is a valid R4 Bundle of AuditEvents."""

import asyncio
import json
import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from medserve.audit.queries import AuditFilter, search_records
from medserve.audit.writer import AuditWriter
from medserve.cli.main import cli
from medserve.db.engine import get_engine
from medserve.db.models import utcnow

KEY = "audit-key-for-tests"


@pytest.fixture
def trail(audit_db_url, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """40 records from two writers (two chains), the CLI pointed at them."""
    monkeypatch.setenv("MEDSERVE_DATABASE_URL", audit_db_url)
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSERVE_AUDIT_SIGNING_KEY", KEY)
    ids = []
    for _ in range(2):
        writer = AuditWriter(audit_db_url, signing_key=KEY.encode(), batch_max=7, checkpoint_every=10)
        records = [
            {"id": uuid.uuid4(), "created_at": utcnow() - timedelta(days=30 - i), "operation": "chat.completions",
             "outcome": "ok" if i % 4 else "denied", "http_status": 200 if i % 4 else 403, "latency_ms": 2.5 + i,
             "model_name": "smollm2-135m-instruct", "model_version": "1.0.0", "caller_name": "ward app",
             "api_key_id": "abc123", "caller_role": "clinical-app", "patient_pseudonym": "f" * 64,
             "prompt_tokens": 12, "completion_tokens": 30}
            for i in range(20)
        ]

        async def write_all() -> None:
            for record in records:  # in order: seq follows created_at
                await writer.write(record, durable=True)

        asyncio.run(write_all())
        writer.close()
        ids += [str(r["id"]) for r in records]
    return audit_db_url, ids


def _verify() -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["audit", "verify"])
    return result.exit_code, result.output


def _sql(url: str, statement: str, **params) -> None:  # type: ignore[no-untyped-def]
    with get_engine(url).begin() as connection:
        connection.execute(text(statement), params)


def _uuid_param(url: str, value: str):  # type: ignore[no-untyped-def]
    # SQLAlchemy's Uuid stores 32 hex characters on SQLite, a native uuid on PostgreSQL.
    return uuid.UUID(value).hex if url.startswith("sqlite") else uuid.UUID(value)


def test_an_untouched_trail_verifies(trail):
    code, output = _verify()
    assert code == 0, output
    assert output.startswith("OK: 40 records in 2 chain(s)")


def test_editing_one_outcome_is_named(trail):
    url, ids = trail
    _sql(url, "UPDATE audit_records SET outcome = 'ok' WHERE id = :id", id=_uuid_param(url, ids[8]))
    code, output = _verify()
    assert code != 0
    assert f"changed: record {ids[8]}" in output


def test_deleting_one_row_is_named(trail):
    url, ids = trail
    _sql(url, "DELETE FROM audit_records WHERE id = :id", id=_uuid_param(url, ids[25]))
    code, output = _verify()
    assert code != 0
    assert "removed:" in output and f"after record {ids[24]}" in output


def test_deleting_the_newest_rows_is_named(trail):
    url, ids = trail
    for record_id in ids[37:]:
        _sql(url, "DELETE FROM audit_records WHERE id = :id", id=_uuid_param(url, record_id))
    code, output = _verify()
    assert code != 0
    assert "removed: chain" in output and f"after record {ids[36]}" in output


def test_inserting_a_row_is_named(trail):
    url, ids = trail
    forged = str(uuid.uuid4())
    _sql(url, "INSERT INTO audit_records (id, created_at, operation, outcome, http_status, latency_ms) "
              "VALUES (:id, :at, 'chat.completions', 'ok', 200, 1.0)", id=_uuid_param(url, forged), at=utcnow())
    code, output = _verify()
    assert code != 0
    assert f"inserted: record {forged}" in output


def test_inserting_a_row_with_forged_chain_fields_is_named(trail):
    url, ids = trail
    forged = str(uuid.uuid4())
    _sql(url, "INSERT INTO audit_records (id, created_at, operation, outcome, http_status, latency_ms, chain_id, seq, "
              "prev_hash, record_hash) SELECT :id, created_at, operation, outcome, http_status, latency_ms, chain_id, "
              "seq + 1, record_hash, record_hash FROM audit_records WHERE id = :last",
         id=_uuid_param(url, forged), last=_uuid_param(url, ids[-1]))
    code, output = _verify()
    assert code != 0
    assert f"record {forged}" in output


def test_prune_keeps_the_remaining_chain_verifiable(trail):
    url, ids = trail
    result = CliRunner().invoke(cli, ["audit", "prune", "--older-than", "20", "--yes"])
    assert result.exit_code == 0, result.output
    assert "pruned 22 audit records" in result.output  # days 30..20 ago of both chains
    code, output = _verify()
    assert code == 0, output
    assert output.startswith("OK: 18 records")
    # A pruned chain still catches deletion at its new start (the signed anchor says where it starts).
    _sql(url, "DELETE FROM audit_records WHERE id = :id", id=_uuid_param(url, ids[11]))
    code, output = _verify()
    assert code != 0 and "removed:" in output


def test_fhir_export_is_an_r4_bundle_of_audit_events(trail, tmp_path):
    pytest.importorskip("fhir.resources", reason="fhir.resources validates the export (pip install fhir.resources)")
    from fhir.resources.R4B.bundle import Bundle

    out = tmp_path / "audit.json"
    result = CliRunner().invoke(cli, ["audit", "export", "--format", "fhir", "-o", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    parsed = Bundle.model_validate(document)  # required fields, types and codes of R4(B) AuditEvent
    assert parsed.type == "collection" and len(parsed.entry) == 40
    event = document["entry"][0]["resource"]
    assert event["resourceType"] == "AuditEvent"
    assert {"type", "recorded", "agent", "source"} <= set(event)
    assert event["agent"][0]["requestor"] is True
    assert event["source"]["observer"]
    details = {d["type"]: d["valueString"] for d in event["entity"][0]["detail"]}
    assert details["model_version"] == "1.0.0"
    assert details["outcome"] == "denied" and event["outcome"] == "4"
    assert {entry["resource"]["outcome"] for entry in document["entry"]} == {"0", "4"}
    patient = [e for e in event["entity"] if e["what"]["identifier"]["system"].endswith("patient-pseudonym")]
    assert patient and patient[0]["what"]["identifier"]["value"] == "f" * 64


def test_search_filters(trail):
    url, ids = trail
    denied = search_records(url, AuditFilter(outcome="denied"), limit=100)
    assert len(denied) == 10 and {r["outcome"] for r in denied} == {"denied"}
    recent = search_records(url, AuditFilter(since=utcnow() - timedelta(days=15)), limit=100)
    assert len(recent) == 8  # 14..11 days ago, two chains
    assert search_records(url, AuditFilter(version="2.0"), limit=5) == []
    first = search_records(url, AuditFilter(), limit=3, oldest_first=True)
    second = search_records(url, AuditFilter(), limit=3, offset=3, oldest_first=True)
    assert len(first) == len(second) == 3
    assert {r["id"] for r in first}.isdisjoint({r["id"] for r in second})
    assert max(r["created_at"] for r in first) <= min(r["created_at"] for r in second)


def test_every_audit_column_is_covered_by_the_record_hash():
    from medserve.audit.chain import HASHED_COLUMNS
    from medserve.db.models import AuditRecord

    # A new column must be added to the hash (as a new format version), or it could be changed unseen.
    assert set(HASHED_COLUMNS) == {c.name for c in AuditRecord.__table__.columns} - {"record_hash"}


def test_one_set_of_migrations_matches_the_models_on_both_databases(audit_db_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from medserve.db.engine import alembic_config
    from medserve.db.models import Base

    with get_engine(audit_db_url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    config = alembic_config(audit_db_url)
    command.downgrade(config, "0908d26b820f")
    command.upgrade(config, "head")

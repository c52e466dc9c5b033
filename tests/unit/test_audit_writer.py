"""The batched audit writer: durable when asked, spools when the database cannot take records, never pretends."""

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import func, select

from medserve.audit.integrity import verify
from medserve.audit.writer import AuditWriter
from medserve.db.engine import session_scope, upgrade
from medserve.db.models import AuditRecord, utcnow
from medserve.errors import AuditUnavailableError
from tests.postgres import wait_until

KEY = b"test-signing-key"


def _record(**overrides):
    record = {
        "id": uuid.uuid4(),
        "created_at": utcnow(),
        "operation": "imaging.analyze",
        "outcome": "ok",
        "http_status": 200,
        "latency_ms": 1.0,
    }
    record.update(overrides)
    return record


def _count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(AuditRecord))


def _ids(url: str) -> set[uuid.UUID]:
    with session_scope(url) as session:
        return set(session.scalars(select(AuditRecord.id)))


async def _burst(writer: AuditWriter, records: list[dict], durable: bool = True) -> None:
    await asyncio.gather(*(writer.write(record, durable=durable) for record in records))


@pytest.fixture
def unmigrated_url(request, tmp_path, postgres_server):  # type: ignore[no-untyped-def]
    """A database that exists but has no schema yet: every insert fails until upgrade()."""
    return f"sqlite:///{tmp_path / 'later.db'}" if request.param == "sqlite" else postgres_server.create_database()


def test_durable_write_is_committed_before_returning(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY)
    try:
        asyncio.run(writer.write(_record(), durable=True))
        assert _count(audit_db_url) == 1
    finally:
        writer.close()


def test_many_concurrent_writes_all_land_in_batches_and_chain(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY, batch_max=50, checkpoint_every=40)
    try:
        asyncio.run(_burst(writer, [_record() for _ in range(300)]))
    finally:
        writer.close()
    assert _count(audit_db_url) == 300
    result = verify(audit_db_url, KEY)
    assert result.ok, result.problems
    # open + at least one periodic + close
    assert result.checkpoints >= 3


def test_close_drains_non_durable_records(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY)

    async def fire_and_forget() -> None:
        for _ in range(25):
            await writer.write(_record(), durable=False)

    asyncio.run(fire_and_forget())
    writer.close()
    assert _count(audit_db_url) == 25
    assert verify(audit_db_url, KEY).ok


def test_without_spool_a_failed_durable_write_raises_audit_unavailable(tmp_path):
    # A database with no schema: every insert fails, and there is nowhere else to keep the record.
    writer = AuditWriter(f"sqlite:///{tmp_path / 'empty.db'}", signing_key=KEY)
    try:
        with pytest.raises(AuditUnavailableError):
            asyncio.run(writer.write(_record(), durable=True))
        assert writer.write_failures >= 1
    finally:
        writer.close()


@pytest.mark.parametrize("unmigrated_url", ["sqlite", "postgresql"], indirect=True)
def test_spooled_records_replay_in_order_exactly_once(unmigrated_url, tmp_path):
    spool = tmp_path / "spool"
    writer = AuditWriter(unmigrated_url, signing_key=KEY, spool_dir=spool, retry_s=0.1, batch_max=20)
    try:
        first = [_record() for _ in range(120)]
        asyncio.run(_burst(writer, first))  # durable: answered from the fsync'd spool
        assert writer.spool_records == 120
        assert writer.write_failures >= 1
        assert list(spool.glob("*.jsonl"))
        upgrade(unmigrated_url)  # the database comes back
        assert wait_until(lambda: writer.spool_records == 0)
        second = [_record() for _ in range(30)]
        asyncio.run(_burst(writer, second))
    finally:
        writer.close()
    assert _ids(unmigrated_url) == {r["id"] for r in first + second}
    assert _count(unmigrated_url) == 150
    result = verify(unmigrated_url, KEY)
    assert result.ok, result.problems
    assert not list(spool.glob("*.jsonl"))  # a clean close leaves no spool behind


_KILLED_WRITER = """
import asyncio, os, sys, uuid
from pathlib import Path
from medserve.audit.writer import AuditWriter
from medserve.db.models import utcnow
writer = AuditWriter(sys.argv[1], signing_key=b"test-signing-key", spool_dir=Path(sys.argv[2]), batch_max=10)
records = [{"id": uuid.uuid4(), "created_at": utcnow(), "operation": "x", "outcome": "ok",
            "http_status": 200, "latency_ms": 1.0} for _ in range(int(sys.argv[3]))]
async def main():
    await asyncio.gather(*(writer.write(r, durable=True) for r in records))
asyncio.run(main())
print("\\n".join(str(r["id"]) for r in records), flush=True)
os.kill(os.getpid(), 9)  # no close(), no drain: as if the replica were killed
"""


@pytest.mark.slow
@pytest.mark.parametrize("unmigrated_url", ["sqlite", "postgresql"], indirect=True)
def test_spool_of_a_killed_writer_is_adopted_by_the_next(unmigrated_url, tmp_path, repo_root):
    spool = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": f"{repo_root / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, unmigrated_url, str(spool), "80"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    acknowledged = {uuid.UUID(line) for line in done.stdout.split()}
    assert len(acknowledged) == 80
    upgrade(unmigrated_url)
    writer = AuditWriter(unmigrated_url, signing_key=KEY, spool_dir=spool, retry_s=0.1)
    try:
        assert wait_until(lambda: writer.spool_records == 0 and _count(unmigrated_url) == 80)
    finally:
        writer.close()
    assert _ids(unmigrated_url) == acknowledged
    assert verify(unmigrated_url, KEY).ok


def test_when_neither_database_nor_spool_works_the_request_is_refused_and_the_chain_stays_whole(tmp_path):
    url = f"sqlite:///{tmp_path / 'later.db'}"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    writer = AuditWriter(url, signing_key=KEY, spool_dir=not_a_dir / "spool", retry_s=0.1)
    try:
        with pytest.raises(AuditUnavailableError):
            asyncio.run(writer.write(_record(), durable=True))
        upgrade(url)
        asyncio.run(_burst(writer, [_record() for _ in range(5)]))
    finally:
        writer.close()
    assert _count(url) == 5
    assert verify(url, KEY).ok  # the refused record left no gap in the chain


def test_a_closed_writer_refuses_instead_of_hanging(database_url):
    writer = AuditWriter(database_url, signing_key=KEY)
    writer.close()
    with pytest.raises(AuditUnavailableError):
        asyncio.run(writer.write(_record(), durable=True))


@pytest.mark.parametrize("unmigrated_url", ["sqlite"], indirect=True)
def test_a_writer_that_never_reached_the_database_hands_its_spool_on(unmigrated_url, tmp_path):
    spool = tmp_path / "spool"
    first = AuditWriter(unmigrated_url, signing_key=KEY, spool_dir=spool, retry_s=0.1)
    records = [_record() for _ in range(3)]
    asyncio.run(_burst(first, records))
    first.close()  # the database is still down: the spool stays, unlocked, for the next writer
    assert list(spool.glob("*.jsonl"))
    upgrade(unmigrated_url)
    second = AuditWriter(unmigrated_url, signing_key=KEY, spool_dir=spool, retry_s=0.1)
    second.close()
    assert _ids(unmigrated_url) == {r["id"] for r in records}
    result = verify(unmigrated_url, KEY)
    assert result.ok, result.problems
    assert result.chains == 2  # the second writer's chain opened and closed empty
    assert not list(spool.glob("*.jsonl"))


def test_a_malformed_record_is_refused_alone_and_the_writer_keeps_working(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY)
    try:
        with pytest.raises(AuditUnavailableError):
            asyncio.run(writer.write({"id": uuid.uuid4()}, durable=True))  # no created_at: cannot be hashed
        asyncio.run(writer.write(_record(), durable=True))
    finally:
        writer.close()
    assert _count(audit_db_url) == 1


def test_a_scopes_values_are_its_columns_by_name_and_land_as_its_row(audit_db_url):
    """The hot routes hand AuditScope.to_values (columns by position) to the writer, the others its dict."""
    from medserve.audit.writer_process import INPUT_COLUMNS
    from medserve.gateway.audit_scope import AuditScope
    from medserve.security.api_keys import Principal
    from medserve.security.roles import Role

    class Entry:  # the catalog entry's fields a record takes
        model_name, model_version, artifact_sha256 = "brain-mri", "2.1.0", "f" * 64

    scope = AuditScope(operation="imaging.analyze", model_name="asked-for", input_sha256="a" * 64,
                       output_sha256="b" * 64, prompt_tokens=11, completion_tokens=7, reasoning_sha256="c" * 64,
                       finish_reason="stop", output_label="tumour", rollout="canary", shadow_of=uuid.uuid4(),
                       context={"patient": "p" * 16, "encounter": "e" * 16, "clinician": "d" * 16,
                                "purpose": "u" * 16})
    scope.entry = Entry()  # type: ignore[assignment]
    scope.time_to_first_token_s = 0.25
    scope.principal = Principal(key_id=uuid.uuid4().hex, name="pacs", role=Role.CLINICAL_APP, department="radiology")
    values = dict(zip(INPUT_COLUMNS, scope.to_values(201, "some_code", "ok"), strict=True))
    timed = {"created_at", "latency_ms"}  # taken at the call
    assert {name: value for name, value in values.items() if name not in timed} == {
        "id": str(scope.id), "api_key_id": scope.principal.key_id, "caller_name": "pacs",
        "caller_role": "clinical-app", "department": "radiology", "model_name": "brain-mri",
        "model_version": "2.1.0", "artifact_sha256": "f" * 64, "operation": "imaging.analyze", "outcome": "ok",
        "http_status": 201, "error_code": "some_code", "input_sha256": "a" * 64, "output_sha256": "b" * 64,
        "prompt_tokens": 11, "completion_tokens": 7, "reasoning_sha256": "c" * 64, "time_to_first_token_ms": 250.0,
        "finish_reason": "stop", "patient_pseudonym": "p" * 16, "encounter_pseudonym": "e" * 16,
        "clinician_pseudonym": "d" * 16, "purpose_pseudonym": "u" * 16, "rollout": "canary", "shadow": True,
        "shadow_of": str(scope.shadow_of), "output_label": "tumour",
    }
    assert values["created_at"].tzinfo is not None and values["latency_ms"] >= 0
    refused = AuditScope(operation="imaging.analyze", model_name="x" * 150)
    record = refused.to_record(403, "permission_denied", "denied")
    assert record["id"] == refused.id and record["model_name"] == "x" * 100 and record["caller_name"] is None
    writer = AuditWriter(audit_db_url, signing_key=KEY)
    try:
        asyncio.run(writer.write(scope.to_values(200, None, "ok"), durable=True))
        asyncio.run(writer.write(record, durable=True))
    finally:
        writer.close()
    with session_scope(audit_db_url) as session:
        rows = {row.id: row for row in session.scalars(select(AuditRecord))}
    assert rows[scope.id].output_label == "tumour" and rows[scope.id].shadow_of == scope.shadow_of
    assert rows[scope.id].caller_name == "pacs" and rows[scope.id].patient_pseudonym == "p" * 16
    assert rows[refused.id].http_status == 403 and rows[refused.id].caller_name is None
    assert verify(audit_db_url, KEY).ok


def test_record_ids_are_time_ordered_version_7_uuids_in_canonical_text():
    from medserve.gateway.audit_scope import AuditScope, new_record_id

    before_ms = time.time_ns() // 1_000_000
    texts = [AuditScope("imaging.analyze", None).id_text for _ in range(2000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(texts)) == len(texts)
    for text in texts:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        # The first 48 bits are the Unix time in milliseconds (RFC 9562): ids sort as they were made.
        assert before_ms <= parsed.int >> 80 <= after_ms
    assert [text[:13] for text in texts] == sorted(text[:13] for text in texts)
    # The rest is written from the random bytes' hex: every random position takes every digit over
    # 2,000 ids (a fixed or biased digit would not), and the variant digit only its four allowed ones.
    fixed = {8: "-", 13: "-", 14: "7", 18: "-", 23: "-"}
    for position in range(15, 36):
        seen = {text[position] for text in texts}
        if position in fixed:
            assert seen == {fixed[position]}
        elif position == 19:
            assert seen == set("89ab")
        else:
            assert len(seen) == 16, position
    given = uuid.uuid4()
    console_event = AuditScope("console.view", None, id=given)
    assert console_event.id == given and console_event.id_text == str(given)
    assert new_record_id().version == 7
    with pytest.raises(TypeError):
        AuditScope("imaging.analyze", None, output_sha="misspelt")

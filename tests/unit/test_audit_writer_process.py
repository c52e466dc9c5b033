"""The audit writer's own process: records land and chain from another process, a killed writer process
loses no acknowledged record and leaves the chains whole, and a writer process outlives neither its
replica nor its socket."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from medserve.audit.integrity import verify
from medserve.audit.writer import COMMITTED, SPOOLED, AuditWriter
from medserve.audit.writer_process import INPUT_COLUMNS, read_frame, send_frame
from medserve.db.engine import session_scope, upgrade
from medserve.db.models import AuditCheckpoint, AuditRecord, utcnow
from medserve.errors import AuditUnavailableError
from tests.audit_rows import audit_count, audit_ids
from tests.postgres import wait_until

KEY = b"test-signing-key"


def _record(**overrides):
    record = {"id": uuid.uuid4(), "created_at": utcnow(), "operation": "imaging.analyze", "outcome": "ok",
              "http_status": 200, "latency_ms": 1.0, "patient_pseudonym": "f" * 64}
    record.update(overrides)
    return record




def _gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may reap an orphan in a container)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return True


@pytest.fixture
def unmigrated_url(request, tmp_path, postgres_server):  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'later.db'}" if request.param == "sqlite" else postgres_server.create_database()


def test_records_are_chained_and_committed_by_another_process(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY, batch_max=40, checkpoint_every=50)
    shadowed = _record()
    records = [shadowed, _record(shadow=True, shadow_of=shadowed["id"], rollout="shadow")]
    records += [_record() for _ in range(200)]
    try:
        async def burst() -> list[str | None]:
            return list(await asyncio.gather(*(writer.write(r, durable=True) for r in records)))

        landed = asyncio.run(burst())
        assert writer.process_id not in (None, os.getpid())
        assert set(landed) == {COMMITTED}
        assert writer.records_committed == len(records)
    finally:
        writer.close()
    assert audit_ids(audit_db_url) == {r["id"] for r in records}
    with session_scope(audit_db_url) as session:
        assert session.scalar(select(AuditRecord.shadow_of).where(AuditRecord.shadow)) == shadowed["id"]
    result = verify(audit_db_url, KEY)
    assert result.ok, result.problems


def test_a_malformed_record_does_not_kill_the_writer_process(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY)
    try:
        asyncio.run(writer.write(_record(), durable=True))
        pid = writer.process_id

        async def mixed() -> list[object]:
            return list(await asyncio.gather(
                writer.write(_record(), durable=True),
                writer.write({"id": uuid.uuid4(), "operation": "x"}, durable=True),  # no created_at: no hash
                writer.write(_record(), durable=True),
                return_exceptions=True,
            ))

        first, refused, last = asyncio.run(mixed())
        assert (first, last) == (COMMITTED, COMMITTED)
        assert isinstance(refused, AuditUnavailableError)
        assert writer.process_id == pid  # the same process carried on
    finally:
        writer.close()
    assert audit_count(audit_db_url) == 3
    assert verify(audit_db_url, KEY).ok


@pytest.mark.slow
def test_sigkill_of_the_writer_process_under_concurrent_strict_writes_loses_no_acknowledged_record(audit_db_url):
    writer = AuditWriter(audit_db_url, signing_key=KEY, batch_max=50, checkpoint_every=100)
    acknowledged: set[uuid.UUID] = set()
    sent = 0
    killed: list[int] = []

    async def producer(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            record = _record()
            sent += 1
            if await writer.write(record, durable=True) in (COMMITTED, SPOOLED):
                acknowledged.add(record["id"])

    async def killer() -> None:
        for _ in range(2):  # twice: the second time, re-sent records may be in doubt for two dead chains
            while len(acknowledged) < 300 * (len(killed) + 1):
                await asyncio.sleep(0.005)
            pid = writer.process_id
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            while writer.process_id == pid:
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        await asyncio.gather(killer(), *(producer(40) for _ in range(32)))

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        writer.close()
    assert len(killed) == 2
    assert sent == 32 * 40 == len(acknowledged)  # every write was answered, none refused
    stored = audit_ids(audit_db_url)
    assert acknowledged == stored  # each exactly once: the table's id is its primary key
    result = verify(audit_db_url, KEY)
    assert result.ok, result.problems
    assert result.chains >= 3


# --- the writer process driven over its socket, as the replica drives it ------------------------


def _start(url: str, *, chain_id: str, spool_dir: Path | None = None, dead: tuple[str, ...] = (),
           repo_root: Path) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(repo_root / "platform")}
    process = subprocess.Popen([sys.executable, "-m", "medserve.audit.writer_process", str(theirs.fileno())],
                               pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    send_frame(ours, ("config", {
        "database_url": url, "signing_key": KEY, "batch_max": 500, "spool_dir": str(spool_dir) if spool_dir else None,
        "checkpoint_every": 1000, "retry_s": 0.1, "db_timeout_s": 2.0, "chain_id": chain_id,
        "parent_pid": os.getpid(), "dead_chain_ids": list(dead),
    }))
    return process, ours


def _wire(record: dict) -> list:
    values = [record.get(name) for name in INPUT_COLUMNS]
    values[INPUT_COLUMNS.index("id")] = str(record["id"])
    return values


_streams: dict[socket.socket, object] = {}


def _outcomes(sock: socket.socket, seqnos: set[int]) -> dict[int, str | None]:
    # One buffered reader per socket: a second one would miss what the first read ahead.
    if sock not in _streams:
        _streams[sock] = sock.makefile("rb")
    stream = _streams[sock]
    outcomes: dict[int, str | None] = {}
    while not seqnos <= outcomes.keys():
        _, acks, *_ = read_frame(stream)
        for outcome, acked in acks:
            outcomes.update(dict.fromkeys(acked, outcome))
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("unmigrated_url", ["sqlite", "postgresql"], indirect=True)
def test_records_a_dead_process_kept_but_never_acked_are_acked_without_relinking(unmigrated_url, tmp_path,
                                                                               repo_root):
    upgrade(unmigrated_url)
    first_chain, second_chain = str(uuid.uuid4()), str(uuid.uuid4())
    records = [_record() for _ in range(20)]
    first, sock = _start(unmigrated_url, chain_id=first_chain, repo_root=repo_root)
    send_frame(sock, ("records", [(n, _wire(r)) for n, r in enumerate(records[:10])]))
    # The first process commits them; its acks are never read: lost with it.
    assert wait_until(lambda: audit_count(unmigrated_url) == 10)
    first.kill()
    first.wait()
    sock.close()
    second, sock = _start(unmigrated_url, chain_id=second_chain, dead=(first_chain,), repo_root=repo_root)
    send_frame(sock, ("in_doubt", [(n, _wire(r)) for n, r in enumerate(records[:15])]))
    send_frame(sock, ("records", [(n, _wire(r)) for n, r in enumerate(records[15:], start=15)]))
    outcomes = _outcomes(sock, set(range(20)))
    sock.shutdown(socket.SHUT_WR)
    assert second.wait(timeout=30) == 0
    sock.close()
    assert set(outcomes.values()) == {COMMITTED}
    assert audit_ids(unmigrated_url) == {r["id"] for r in records}
    result = verify(unmigrated_url, KEY)
    assert result.ok, result.problems  # no seq gap in the second chain
    with session_scope(unmigrated_url) as session:
        in_second = session.scalar(select(func.count()).where(AuditRecord.chain_id == second_chain))
    assert in_second == 10  # records[10:20]: the first ten stayed in the first chain only


@pytest.mark.slow
def test_records_a_dead_process_spooled_but_never_acked_are_acked_as_spooled(tmp_path, repo_root):
    url = f"sqlite:///{tmp_path / 'later.db'}"  # no schema yet: everything goes to the spool
    spool = tmp_path / "spool"
    first_chain = str(uuid.uuid4())
    records = [_record() for _ in range(8)]
    first, sock = _start(url, chain_id=first_chain, spool_dir=spool, repo_root=repo_root)
    send_frame(sock, ("records", [(n, _wire(r)) for n, r in enumerate(records[:5])]))
    assert set(_outcomes(sock, set(range(5))).values()) == {SPOOLED}
    first.kill()
    first.wait()
    sock.close()
    second, sock = _start(url, chain_id=str(uuid.uuid4()), spool_dir=spool, dead=(first_chain,),
                          repo_root=repo_root)
    send_frame(sock, ("in_doubt", [(n, _wire(r)) for n, r in enumerate(records)]))
    assert set(_outcomes(sock, set(range(5))).values()) == {SPOOLED}  # found in the dead process's spool
    # The other three may have been committed by the dead process as far as the second can tell while
    # the database cannot be asked: they wait for it instead of being linked twice.
    upgrade(url)  # the database comes back: the second process replays the spool, then links the three
    assert set(_outcomes(sock, {5, 6, 7}).values()) <= {COMMITTED, SPOOLED}
    assert wait_until(lambda: audit_count(url) == 8)
    sock.shutdown(socket.SHUT_WR)
    assert second.wait(timeout=30) == 0
    sock.close()
    assert audit_ids(url) == {r["id"] for r in records}
    result = verify(url, KEY)
    assert result.ok, result.problems
    assert not list(spool.glob("*.jsonl"))


@pytest.mark.slow
def test_the_writer_process_drains_and_exits_when_the_socket_closes(tmp_path, repo_root):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    records = [_record() for _ in range(50)]
    process, sock = _start(url, chain_id=str(uuid.uuid4()), repo_root=repo_root)
    send_frame(sock, ("records", [(n, _wire(r)) for n, r in enumerate(records)]))
    sock.close()  # the replica is gone without reading a single ack
    assert process.wait(timeout=30) == 0
    assert audit_ids(url) == {r["id"] for r in records}
    result = verify(url, KEY)
    assert result.ok, result.problems
    with session_scope(url) as session:
        kinds = set(session.scalars(select(AuditCheckpoint.kind)))
    assert "close" in kinds


_KILLED_REPLICA = """
import asyncio, os, sys, uuid
from medserve.audit.writer import AuditWriter
from medserve.db.models import utcnow
writer = AuditWriter(sys.argv[1], signing_key=b"test-signing-key")
async def main():
    for _ in range(20):
        await writer.write({"id": uuid.uuid4(), "created_at": utcnow(), "operation": "x", "outcome": "ok",
                            "http_status": 200, "latency_ms": 1.0}, durable=True)
asyncio.run(main())
print(writer.process_id, flush=True)
os.kill(os.getpid(), 9)  # no close(): the writer process must notice on its own
"""


@pytest.mark.slow
def test_the_writer_process_exits_when_its_replica_is_killed(tmp_path, repo_root):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    env = {**os.environ, "PYTHONPATH": str(repo_root / "platform")}
    done = subprocess.run([sys.executable, "-c", _KILLED_REPLICA, url], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    writer_pid = int(done.stdout.split()[0])
    assert wait_until(lambda: _gone(writer_pid), timeout=30)
    assert audit_count(url) == 20
    result = verify(url, KEY)
    assert result.ok, result.problems

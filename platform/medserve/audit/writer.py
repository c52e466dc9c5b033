"""Batched audit writer: one background thread per process, bulk inserts, a durable spool.

Requests hand their record to a bounded queue and (with durability "strict")
wait until it is durable: committed to the database, or, when the database is
unreachable, slow or refusing writes, appended and fsync'd to this writer's
spool file under the spool directory. The thread commits whatever has piled
up in one Core bulk insert, so throughput grows with load instead of paying
one transaction per request.

While a spool holds records, new records go to the spool too (order is kept)
and the thread retries the database every ``retry_s``; when it answers, the
spool is replayed in order with ``INSERT ... ON CONFLICT (id) DO NOTHING``, so
a record lands exactly once even if a commit's acknowledgement was lost.
Spool files of writers that died (a killed replica) are found by their free
file lock and replayed by the next writer that starts on the same directory.

Every record is linked into this writer's hash chain before it is persisted
(:mod:`medserve.audit.chain`), with signed checkpoints: one when the chain
opens, at least every ``checkpoint_every`` records, and on close.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import operator
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine

from medserve import metrics
from medserve.audit.chain import Chain
from medserve.db.engine import get_engine
from medserve.db.models import AuditCheckpoint, AuditRecord, utcnow
from medserve.errors import AuditUnavailableError

logger = logging.getLogger("medserve.audit")

_STOP = object()
# Where a durable record landed, as its producer learns it: None when it could be neither.
COMMITTED, SPOOLED = "committed", "spooled"
# (record, the producer's event loop, its future or None when it does not wait)
_Item = tuple[dict[str, Any], asyncio.AbstractEventLoop, "asyncio.Future[str | None] | None"]
_REPLAY_CHUNK = 2000
_ORPHAN_SCAN_S = 10.0


def _error_name(error: BaseException) -> str:
    """The database's own error class (InsufficientPrivilege, ...) without its message (may hold values)."""
    orig = getattr(error, "orig", None)
    return type(orig).__name__ if orig is not None else type(error).__name__


_COLUMNS = [column.name for column in AuditRecord.__table__.columns]
_COLUMN_LIST = ", ".join(_COLUMNS)
_column_values = operator.itemgetter(*_COLUMNS)


def _row(record: dict[str, Any]) -> list[Any]:
    try:
        return list(_column_values(record))
    except KeyError:  # a partial record: absent columns are NULL
        return [record.get(name) for name in _COLUMNS]
_PG_STAGE = "medserve_audit_in"


def _bulk_insert_postgresql(connection: Connection, records: list[dict[str, Any]]) -> None:
    """COPY into a session-local staging table, then one INSERT ... ON CONFLICT (id) DO NOTHING.

    COPY is PostgreSQL's bulk path (several times a multi-row INSERT's rate);
    the staging table keeps the idempotence that replay needs.
    """
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_PG_STAGE} (LIKE audit_records) ON COMMIT DELETE ROWS")
    with cursor.copy(f"COPY {_PG_STAGE} ({_COLUMN_LIST}) FROM STDIN") as copy:
        for record in records:
            copy.write_row(_column_values(record) if len(record) == len(_COLUMNS) else _row(record))
    cursor.execute(
        f"INSERT INTO audit_records ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_PG_STAGE} "
        "ON CONFLICT (id) DO NOTHING"
    )


_SQLITE_INSERT = (
    f"INSERT INTO audit_records ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)
_ID_INDEX, _CREATED_INDEX = _COLUMNS.index("id"), _COLUMNS.index("created_at")


def _bulk_insert_sqlite(connection: Connection, records: list[dict[str, Any]]) -> None:
    """One executemany in the driver, values in the exact form SQLAlchemy stores on SQLite (Uuid as hex,
    UTC timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff'); the ORM reads them back unchanged."""
    rows = []
    for record in records:
        row = _row(record)
        row[_ID_INDEX] = row[_ID_INDEX].hex
        row[_CREATED_INDEX] = row[_CREATED_INDEX].astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append(tuple(row))
    connection.exec_driver_sql(_SQLITE_INSERT, rows)


def _on_conflict_do_nothing(engine: Engine, table: Any) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - medserve supports SQLite and PostgreSQL
        raise NotImplementedError(engine.dialect.name)
    return insert(table).on_conflict_do_nothing(index_elements=["id"])


def _settle(batch: list[_Item], durable: str | None) -> None:
    """Wake the waiting producers: one thread-safe call per event loop, not one per record."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[str | None]]] = defaultdict(list)
    for _, loop, future in batch:
        if future is not None:
            by_loop[loop].append(future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, durable)
        except RuntimeError:  # the producer's loop is gone: nobody waits any more
            pass


def _resolve(futures: list[asyncio.Future[str | None]], durable: str | None) -> None:
    for future in futures:
        if not future.done():
            future.set_result(durable)


def _to_json(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    row["id"] = uuid.UUID(row["id"])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class SpoolFile:
    """An append-only JSON-lines file of records and checkpoints, held under an exclusive lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.pending = 0  # records waiting in the file
        self.entries = 0  # records and checkpoints waiting in the file

    @classmethod
    def create(cls, path: Path) -> "SpoolFile":
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path) -> "SpoolFile | None":
        """The spool of a writer that is gone (its lock is free), or None while its owner lives."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        spool = cls(path, fd)
        entries = spool.read()
        spool.entries = len(entries)
        spool.pending = sum(1 for kind, _ in entries if kind == "r")
        return spool

    def append(self, records: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> None:
        lines = [json.dumps({"r": {k: _to_json(v) for k, v in row.items()}}) for row in records]
        lines += [json.dumps({"c": {k: _to_json(v) for k, v in row.items()}}) for row in checkpoints]
        data = ("\n".join(lines) + "\n").encode()
        written = 0
        while written < len(data):
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)
        self.pending += len(records)
        self.entries += len(records) + len(checkpoints)

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        entries: list[tuple[str, dict[str, Any]]] = []
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle):
                try:
                    item = json.loads(line)
                except ValueError:
                    # A line cut short by a crash: its records were never acknowledged.
                    logger.warning("audit spool %s: ignoring an incomplete line %d", self.path.name, number + 1)
                    continue
                kind = "r" if "r" in item else "c"
                entries.append((kind, _from_json(item[kind])))
        return entries

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.pending = self.entries = 0

    def release(self) -> None:
        os.close(self.fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.pending = self.entries = 0


class AuditWriter:
    def __init__(
        self,
        database_url: str,
        *,
        signing_key: bytes,
        batch_max: int = 500,
        queue_max: int = 20_000,
        spool_dir: Path | None = None,
        checkpoint_every: int = 1000,
        retry_s: float = 1.0,
        db_timeout_s: float = 5.0,
    ) -> None:
        self._database_url = database_url
        self._batch_max = batch_max
        self._spool_dir = spool_dir
        self._checkpoint_every = checkpoint_every
        self._retry_s = retry_s
        self._db_timeout_s = db_timeout_s
        self._chain = Chain(signing_key)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._own_spool: SpoolFile | None = None
        self._orphans: list[SpoolFile] = []
        self._pending_checkpoints = [self._chain.checkpoint("open", utcnow())]
        self._last_attempt = 0.0
        self._last_orphan_scan = 0.0
        self._write_failures = 0
        self._records_committed = 0
        self._records_spooled = 0
        self._failing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="medserve-audit-writer", daemon=True)
        self._thread.start()

    # --- metrics -----------------------------------------------------------------

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    @property
    def queue_depth(self) -> int:
        """Records waiting for the writer thread."""
        return self._queue.qsize()

    @property
    def spool_records(self) -> int:
        """Records durable only in spool files (this writer's and adopted ones), not yet in the database."""
        return (self._own_spool.pending if self._own_spool else 0) + sum(s.pending for s in self._orphans)

    def _spooled_entries(self) -> int:
        return (self._own_spool.entries if self._own_spool else 0) + sum(s.entries for s in self._orphans)

    @property
    def spooling(self) -> bool:
        """True while a spool holds entries: every new record goes to the spool until the replay."""
        return self._spooled_entries() > 0

    @property
    def failing(self) -> bool:
        """True when the last batch could be made durable neither in the database nor in the spool."""
        return self._failing

    @property
    def write_failures(self) -> int:
        """Database writes (batches or replays) that failed since start; each one is logged."""
        return self._write_failures

    @property
    def records_committed(self) -> int:
        """Records this writer put in the database, directly or by replay."""
        return self._records_committed

    @property
    def records_spooled(self) -> int:
        """Records this writer ever had to spool."""
        return self._records_spooled

    # --- producers ---------------------------------------------------------------

    async def write(self, record: dict[str, Any], *, durable: bool) -> str | None:
        """Queue a record; with durable=True return only once it is committed or spooled, and say which
        (COMMITTED or SPOOLED; None for a record not waited on).

        Raises AuditUnavailableError when a durable record could be neither.
        """
        if self._closed:
            raise AuditUnavailableError("the audit writer is shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] | None = loop.create_future() if durable else None
        item = (record, loop, future)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # Back-pressure instead of dropping: the caller waits for room.
            await asyncio.to_thread(self._queue.put, item)
        if future is None:
            return None
        landed = await future
        if landed is None:
            raise AuditUnavailableError()
        return landed

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued (to the database or the spool), checkpoint, then stop the thread."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or spooled (tests, shutdown hooks); True when reached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_depth == 0 and self._spooled_entries() == 0:
                return True
            time.sleep(0.05)
        return False

    # --- the writer thread -------------------------------------------------------

    def _make_engine(self) -> Engine:
        if self._database_url.startswith("postgresql"):
            # A dedicated pool with timeouts: a hung database sends records to
            # the spool instead of holding requests.
            return create_engine(
                self._database_url,
                pool_pre_ping=True,
                pool_size=2,
                max_overflow=0,
                connect_args={
                    "connect_timeout": max(1, int(self._db_timeout_s)),
                    "options": f"-c statement_timeout={int(self._db_timeout_s * 1000)}",
                },
            )
        return get_engine(self._database_url)

    def _take_batch(self, timeout: float | None) -> tuple[list[_Item], bool]:
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch = [first]
        stop = False
        while len(batch) < self._batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        self._engine = self._make_engine()
        self._bulk = _bulk_insert_postgresql if self._engine.dialect.name == "postgresql" else _bulk_insert_sqlite
        self._checkpoints = _on_conflict_do_nothing(self._engine, AuditCheckpoint.__table__)
        self._scan_orphans()
        if self._orphans:
            self._replay()
        while True:
            spooling = self._spooled_entries() > 0
            batch, stop = self._take_batch(self._retry_s if spooling else _ORPHAN_SCAN_S)
            now = time.monotonic()
            if self._spool_dir is not None and now - self._last_orphan_scan >= _ORPHAN_SCAN_S:
                self._scan_orphans()  # a sibling replica on this directory may have been killed
            if spooling and now - self._last_attempt >= self._retry_s:
                self._replay()
            if batch or stop or self._pending_checkpoints:
                self._persist_batch(batch, stop)
            if stop:
                self._shutdown()
                return

    def _shutdown(self) -> None:
        if self._spooled_entries():
            self._replay()
        for spool in [*self._orphans, *([self._own_spool] if self._own_spool else [])]:
            if spool.entries == 0 and spool is self._own_spool:
                spool.remove()
            elif spool.entries:
                # Unlock it so the next writer on this directory adopts and replays it.
                logger.error("audit database still unavailable at shutdown: %d records stay in spool %s",
                             spool.pending, spool.path)
                spool.release()

    def _persist_batch(self, batch: list[_Item], stop: bool) -> None:
        chain = self._chain
        saved = (chain.seq, chain.last_hash, chain.since_checkpoint)
        records, linked = [], []
        for item in batch:
            # A malformed record (a bug upstream) is refused alone; it must not
            # take the writer thread down with it, or every later durable write
            # would wait forever.
            link_state = (chain.seq, chain.last_hash, chain.since_checkpoint)
            try:
                records.append(chain.link(item[0]))
            except Exception as error:  # noqa: BLE001
                chain.seq, chain.last_hash, chain.since_checkpoint = link_state
                logger.error("malformed audit record refused (%s)", type(error).__name__)
                _settle([item], None)
            else:
                linked.append(item)
        batch = linked
        checkpoints = list(self._pending_checkpoints)
        if chain.since_checkpoint >= self._checkpoint_every or (stop and records) or (stop and chain.seq):
            checkpoints.append(chain.checkpoint("close" if stop else "periodic", utcnow()))
        try:
            landed = self._persist(records, checkpoints)
        except Exception as error:  # noqa: BLE001 - neither the database nor the spool took it
            self._failing = True
            # Undo the links: the records were not kept, so the chain must not count them.
            chain.seq, chain.last_hash, chain.since_checkpoint = saved
            logger.error(
                "audit records could not be made durable (%s): %d request(s) refused",
                _error_name(error), len(batch),
            )
            _settle(batch, None)
            return
        self._failing = False
        self._pending_checkpoints = []
        _settle(batch, landed)

    def _persist(self, records: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> str:
        """COMMITTED or SPOOLED; raises when neither the database nor the spool took them."""
        if self._spooled_entries() == 0:
            started = time.perf_counter()
            try:
                self._insert(records, checkpoints)
                metrics.record_audit_commit(records=len(records), failed=False, duration_s=time.perf_counter() - started)
                return COMMITTED
            except Exception as error:  # noqa: BLE001
                metrics.record_audit_commit(records=len(records), failed=True, duration_s=time.perf_counter() - started)
                self._write_failures += 1
                self._last_attempt = time.monotonic()
                if self._spool_dir is None:
                    raise
                logger.error(
                    "audit database write failed (%s); spooling audit records to %s until it accepts them",
                    _error_name(error), self._spool_dir,
                )
        if self._spool_dir is None:
            raise AuditUnavailableError("audit records are spooled but no spool directory is set")
        if self._own_spool is None:
            self._own_spool = SpoolFile.create(self._spool_dir / f"{self._chain.chain_id}.jsonl")
        self._own_spool.append(records, checkpoints)
        self._records_spooled += len(records)
        return SPOOLED

    def _insert(self, records: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            if records:
                self._bulk(connection, records)
            if checkpoints:
                connection.execute(self._checkpoints, checkpoints)
        self._records_committed += len(records)

    # --- spool replay ------------------------------------------------------------

    def _scan_orphans(self) -> None:
        self._last_orphan_scan = time.monotonic()
        if self._spool_dir is None or not self._spool_dir.is_dir():
            return
        held = {spool.path for spool in self._orphans}
        if self._own_spool is not None:
            held.add(self._own_spool.path)
        for path in sorted(self._spool_dir.glob("*.jsonl")):
            if path in held or path.stem == self._chain.chain_id:
                continue
            spool = SpoolFile.adopt(path)
            if spool is None:
                continue
            if spool.entries == 0:
                spool.remove()
                continue
            logger.warning("adopting audit spool %s of a writer that stopped (%d records)", path.name, spool.pending)
            self._orphans.append(spool)

    def _replay(self) -> None:
        """Move spooled entries into the database, oldest file first; stop at the first failure."""
        self._last_attempt = time.monotonic()
        if self._spool_dir is not None and time.monotonic() - self._last_orphan_scan >= _ORPHAN_SCAN_S:
            self._scan_orphans()
        spools = list(self._orphans) + ([self._own_spool] if self._own_spool and self._own_spool.entries else [])
        for spool in spools:
            entries = spool.read()
            started = time.perf_counter()
            try:
                with self._engine.begin() as connection:
                    for start in range(0, len(entries), _REPLAY_CHUNK):
                        chunk = entries[start : start + _REPLAY_CHUNK]
                        records = [row for kind, row in chunk if kind == "r"]
                        checkpoints = [row for kind, row in chunk if kind == "c"]
                        if records:
                            self._bulk(connection, records)
                        if checkpoints:
                            connection.execute(self._checkpoints, checkpoints)
            except Exception as error:  # noqa: BLE001
                metrics.record_audit_commit(records=spool.pending, failed=True, duration_s=time.perf_counter() - started)
                self._write_failures += 1
                logger.warning("audit spool replay still failing (%s); %d records wait in the spool",
                               _error_name(error), self.spool_records)
                return
            replayed = spool.pending
            metrics.record_audit_commit(records=replayed, failed=False, duration_s=time.perf_counter() - started)
            self._records_committed += replayed
            if spool is self._own_spool:
                spool.clear()
            else:
                spool.remove()
                self._orphans.remove(spool)
            logger.warning("audit database accepts writes again: replayed %d spooled records from %s",
                           replayed, spool.path.name)

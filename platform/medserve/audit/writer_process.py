"""The audit writer's own process: hash chain, batches, inserts, commits, spool, replay.

One writer process per gateway replica, spawned by the replica's
:class:`medserve.audit.writer.AuditWriter` (a fresh interpreter, not a fork:
a Ray replica has threads and gRPC state that a fork would copy half-way).
The replica sends compact records over a Unix socket pair; this process links
each into its keyed hash chain, batches, bulk-inserts and commits (or appends
and fsyncs to its spool file when the database cannot take them), and acks
back ``(outcome, [sequence numbers])`` with its counters, commit timings and
log lines, which the replica re-emits on its own logger and metrics.

Why a process per replica rather than one shared per host: the replica owns
its writer's lifetime (spawn, restart on a crash, re-send what was not acked),
there is no registry of shared writers to get wrong, and a killed replica's
writer sees EOF and drains on its own. The chain, the spool file and the
orphan adoption work exactly as they did in the writer thread.

Crash semantics:

- The replica is killed: EOF on the socket (or SIGTERM from
  ``PR_SET_PDEATHSIG``): everything received is made durable (database or
  spool), the chain is checkpointed, and the process exits.
- This process is killed: the replica sees EOF, starts a new writer process
  and re-sends every record not yet acked, flagged "in doubt". A record in
  doubt may already be durable in the dead process's chain (committed, or in
  its spool, with the ack lost); linking it again would make the second copy
  hit ON CONFLICT and leave a seq gap in the new chain. So the new process
  looks for each in-doubt id in the spool files (read, not locked) and then in
  the database (after the dead process's PostgreSQL sessions are gone, so a
  COMMIT already on the wire cannot land after the check), acks the ones found
  without linking them, and links only the rest. While the database cannot be
  asked, in-doubt records wait (their requests stay unanswered) and are
  refused after ``IN_DOUBT_GIVE_UP_S``: a refused request may have a row, an
  answered one always has exactly one.

Wire format: frames of a 4-byte big-endian length and a pickle (both ends are
this module's code, on one host, over a private socket pair).
"""

from __future__ import annotations

import ctypes
import logging
import operator
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from datetime import timezone
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import Connection, Engine, create_engine

from medserve.audit.chain import CHAIN_COLUMNS, Chain, RowLayout
from medserve.audit.spool import SpoolFile, spooled_ids
from medserve.db.engine import database_error_name, get_engine
from medserve.db.models import AuditCheckpoint, AuditRecord, utcnow

logger = logging.getLogger("medserve.audit")

# Where a durable record landed, as its producer learns it: None when it could be neither.
COMMITTED, SPOOLED = "committed", "spooled"
_REPLAY_CHUNK = 2000
_ORPHAN_SCAN_S = 10.0
IN_DOUBT_GIVE_UP_S = 30.0
_DEAD_SESSION_WAIT_S = 10.0
_HELD_IDLE_S = 1.0

# --- the wire --------------------------------------------------------------------

_HEADER = struct.Struct("!I")


def send_frame(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def read_frame(stream: BinaryIO) -> Any:
    """The next message, or raises EOFError when the other end is gone."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


# --- records ---------------------------------------------------------------------

_COLUMNS = [column.name for column in AuditRecord.__table__.columns]
# What the replica sends, in this order: every column but the chain's (the gateway's record dict).
INPUT_COLUMNS = tuple(name for name in _COLUMNS if name not in CHAIN_COLUMNS)
# A record inside this process: a list of the input values, then the chain's columns (chain.RowLayout).
_LAYOUT = RowLayout(INPUT_COLUMNS)
ROW_COLUMNS = _LAYOUT.columns
_COLUMN_LIST = ", ".join(ROW_COLUMNS)
_row_values = operator.itemgetter(*ROW_COLUMNS)
_ID_INDEX, _CREATED_INDEX, _SHADOW_OF_INDEX = (ROW_COLUMNS.index(name) for name in ("id", "created_at", "shadow_of"))


def _row(record: dict[str, Any]) -> list[Any]:
    """A spooled record (a dict) as a row."""
    try:
        return list(_row_values(record))
    except KeyError:  # a partial record: absent columns are NULL
        return [record.get(name) for name in ROW_COLUMNS]


_PG_STAGE = "medserve_audit_in"
_CHECKPOINT_COLUMNS = tuple(column.name for column in AuditCheckpoint.__table__.columns)
_checkpoint_values = operator.itemgetter(*_CHECKPOINT_COLUMNS)


def _copy_rows(cursor: Any, table: str, rows: list[list[Any]]) -> None:
    """COPY, PostgreSQL's bulk path (several times a multi-row INSERT's rate). UUIDs and timestamps may
    come as text (a linked row) or as objects (a spool replay): COPY's text form takes both."""
    with cursor.copy(f"COPY {table} ({_COLUMN_LIST}) FROM STDIN") as copy:
        write_row = copy.write_row
        for row in rows:
            write_row(row)


_PG_CHECKPOINT_INSERT = (
    f"INSERT INTO audit_checkpoints ({', '.join(_CHECKPOINT_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(_CHECKPOINT_COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)


def _insert_postgresql(driver: Any, rows: list[list[Any]], checkpoints: list[dict[str, Any]]) -> None:
    """A new batch, on a psycopg connection in autocommit mode.

    Without checkpoints (most batches) the batch is one COPY straight into audit_records, which
    autocommit makes its own transaction: committed (and flushed to the WAL) when the COPY returns, in
    two round trips instead of BEGIN, COPY, COPY data and COMMIT. With checkpoints, both in one
    transaction. Its records are fresh, or re-sent ones the database was just asked about (their first
    writer's sessions gone), so no id can already be there; a duplicate would fail the batch (and send
    it to the spool, whose replay is idempotent), never drop a row silently.
    """
    cursor = driver.cursor()
    if not checkpoints:
        _copy_rows(cursor, "audit_records", rows)
        return
    with driver.transaction():
        if rows:
            _copy_rows(cursor, "audit_records", rows)
        cursor.executemany(_PG_CHECKPOINT_INSERT, [_checkpoint_values(row) for row in checkpoints])


def _replay_postgresql(connection: Connection, rows: list[list[Any]]) -> None:
    """Spooled records, inside the caller's transaction. A replay cut short may have committed some
    already: a session-local staging table and one INSERT ... ON CONFLICT (id) DO NOTHING."""
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_PG_STAGE} (LIKE audit_records) ON COMMIT DELETE ROWS")
    _copy_rows(cursor, _PG_STAGE, rows)
    cursor.execute(
        f"INSERT INTO audit_records ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_PG_STAGE} "
        "ON CONFLICT (id) DO NOTHING"
    )


_SQLITE_INSERT = (
    f"INSERT INTO audit_records ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(ROW_COLUMNS))}) "
    "ON CONFLICT (id) DO NOTHING"
)
_SQLITE_CHECKPOINT_INSERT = (
    f"INSERT INTO audit_checkpoints ({', '.join(_CHECKPOINT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_CHECKPOINT_COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)
_CHECKPOINT_ID, _CHECKPOINT_CREATED = _CHECKPOINT_COLUMNS.index("id"), _CHECKPOINT_COLUMNS.index("created_at")


def _uuid_hex(value: Any) -> Any:
    """SQLAlchemy's Uuid on SQLite: 32 hex digits, whether the value came as uuid.UUID or as text."""
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, str):
        return value.replace("-", "")
    return value


def _sqlite_timestamp(value: Any) -> str:
    """SQLAlchemy's DateTime on SQLite: 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC, from the UTC ISO text a
    linked row carries (``2026-01-02T03:04:05.000006+00:00``) or from a datetime (a spool replay)."""
    if isinstance(value, str):
        return f"{value[:10]} {value[11:26]}"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_rows(rows: list[list[Any]]) -> list[list[Any]]:
    """Values in the exact form SQLAlchemy stores on SQLite (Uuid as hex, UTC timestamps as
    'YYYY-MM-DD HH:MM:SS.ffffff'): the ORM reads them back unchanged. Copies: the rows may still go to
    the spool as they were."""
    values = []
    for row in rows:
        row = list(row)
        row[_ID_INDEX] = _uuid_hex(row[_ID_INDEX])
        if row[_SHADOW_OF_INDEX] is not None:
            row[_SHADOW_OF_INDEX] = _uuid_hex(row[_SHADOW_OF_INDEX])
        row[_CREATED_INDEX] = _sqlite_timestamp(row[_CREATED_INDEX])
        values.append(row)
    return values


def _insert_sqlite(driver: Any, rows: list[list[Any]], checkpoints: list[dict[str, Any]]) -> None:
    """A new batch, on the sqlite3 connection: one executemany, one commit. ON CONFLICT costs SQLite
    nothing measurable, so new batches and replays share the statement."""
    try:
        if rows:
            driver.executemany(_SQLITE_INSERT, _sqlite_rows(rows))
        if checkpoints:
            values = []
            for checkpoint in checkpoints:
                row = list(_checkpoint_values(checkpoint))
                row[_CHECKPOINT_ID] = _uuid_hex(row[_CHECKPOINT_ID])
                row[_CHECKPOINT_CREATED] = _sqlite_timestamp(row[_CHECKPOINT_CREATED])
                values.append(row)
            driver.executemany(_SQLITE_CHECKPOINT_INSERT, values)
        driver.commit()
    except BaseException:
        driver.rollback()
        raise


def _replay_sqlite(connection: Connection, rows: list[list[Any]]) -> None:
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(_SQLITE_INSERT, _sqlite_rows(rows))
    finally:
        cursor.close()


def _on_conflict_do_nothing(engine: Engine, table: Any) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - medserve supports SQLite and PostgreSQL
        raise NotImplementedError(engine.dialect.name)
    return insert(table).on_conflict_do_nothing(index_elements=["id"])


# --- log lines travel to the replica ---------------------------------------------


class _ForwardingHandler(logging.Handler):
    """Keeps this process's audit log lines for the next message: the replica logs them as its own
    (its log shipping, and tests' caplog, see one writer)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lines_lock:
            self.lines.append((record.levelno, record.getMessage()))

    def take(self) -> list[tuple[int, str]]:
        with self._lines_lock:
            lines, self.lines = self.lines, []
        return lines


# --- the process -----------------------------------------------------------------

_EOF = object()
# (the replica's sequence number, the record's values in INPUT_COLUMNS order)
_Item = tuple[int, list[Any]]
_ID_AT = INPUT_COLUMNS.index("id")


class WriterProcess:
    def __init__(self, sock: socket.socket, stream: BinaryIO, config: dict[str, Any],
                 forward: _ForwardingHandler) -> None:
        self._sock = sock
        self._stream = stream
        self._forward = forward
        self._database_url: str = config["database_url"]
        self._batch_max: int = config["batch_max"]
        self._spool_dir: Path | None = Path(config["spool_dir"]) if config["spool_dir"] else None
        self._checkpoint_every: int = config["checkpoint_every"]
        self._retry_s: float = config["retry_s"]
        self._db_timeout_s: float = config["db_timeout_s"]
        self._dead_chains: list[str] = list(config.get("dead_chain_ids", ()))
        self._chain = Chain(config["signing_key"], config["chain_id"])
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._leftover: list[_Item] = []
        self._in_doubt: list[_Item] = []
        self._in_doubt_since = 0.0
        self._own_spool: SpoolFile | None = None
        self._orphans: list[SpoolFile] = []
        self._pending_checkpoints = [self._chain.checkpoint("open", utcnow())]
        self._last_attempt = 0.0
        self._last_orphan_scan = 0.0
        self._write_failures = 0
        self._records_committed = 0
        self._records_spooled = 0
        self._failing = False
        self._acks: list[tuple[str | None, list[int]]] = []
        self._commits: list[tuple[int, bool, float]] = []
        self._last_stats: tuple[Any, ...] | None = None
        self._replica_gone = False
        self._held: Any = None  # a pool-proxied driver connection
        self._held_used = 0.0

    # --- the socket's reading end --------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                kind, items = read_frame(self._stream)
                self._inbox.put((kind == "in_doubt", items))
        except (EOFError, OSError):
            pass
        finally:
            self._inbox.put(_EOF)

    def stop_reading(self, *_: Any) -> None:
        """SIGTERM (the replica died: PR_SET_PDEATHSIG): stop taking records, drain, exit."""
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # --- reporting back ------------------------------------------------------------

    def _stats(self) -> tuple[Any, ...]:
        return (self.spool_records, self._spooled_entries(), self._failing, self._write_failures,
                self._records_committed, self._records_spooled)

    def _send_update(self) -> None:
        stats = self._stats()
        lines = self._forward.take()
        if not (self._acks or self._commits or lines) and stats == self._last_stats:
            return
        message = ("acks", self._acks, stats, self._commits, lines)
        self._acks, self._commits, self._last_stats = [], [], stats
        if self._replica_gone:
            return
        try:
            send_frame(self._sock, message)
        except OSError:
            # The replica is gone: what it waited for is durable anyway; nobody reads the acks.
            self._replica_gone = True

    def _ack(self, items: list[_Item], outcome: str | None) -> None:
        if items:
            self._acks.append((outcome, [seqno for seqno, _ in items]))

    @property
    def spool_records(self) -> int:
        return (self._own_spool.pending if self._own_spool else 0) + sum(s.pending for s in self._orphans)

    def _spooled_entries(self) -> int:
        return (self._own_spool.entries if self._own_spool else 0) + sum(s.entries for s in self._orphans)

    # --- the loop ------------------------------------------------------------------

    def _make_engine(self) -> Engine:
        if self._database_url.startswith("postgresql"):
            # A dedicated pool with timeouts: a hung database sends records to
            # the spool instead of holding requests. The application name lets
            # a successor see when this process's sessions are gone.
            return create_engine(
                self._database_url,
                pool_pre_ping=True,
                pool_size=2,
                max_overflow=0,
                connect_args={
                    "connect_timeout": max(1, int(self._db_timeout_s)),
                    "options": f"-c statement_timeout={int(self._db_timeout_s * 1000)}",
                    "application_name": _application_name(self._chain.chain_id),
                },
            )
        return get_engine(self._database_url)

    def _take_batch(self, timeout: float | None) -> tuple[list[_Item], list[_Item], bool]:
        """(new records, records in doubt, stop): at most batch_max new records, the rest kept for later."""
        batch, in_doubt, stop = self._leftover, [], False
        self._leftover = []
        if not batch:
            try:
                first = self._inbox.get(timeout=timeout)
            except queue.Empty:
                return [], [], False
            if first is _EOF:
                return [], [], True
            (in_doubt if first[0] else batch).extend(first[1])
        while len(batch) < self._batch_max:
            try:
                frame = self._inbox.get_nowait()
            except queue.Empty:
                break
            if frame is _EOF:
                stop = True
                break
            (in_doubt if frame[0] else batch).extend(frame[1])
        if len(batch) > self._batch_max:
            batch, self._leftover = batch[: self._batch_max], batch[self._batch_max :]
        if stop and self._leftover:
            # Drain in batch_max steps: put the end back behind what is left.
            self._inbox.put(_EOF)
            stop = False
        return batch, in_doubt, stop

    def run(self) -> None:
        threading.Thread(target=self._read_loop, name="medserve-audit-reader", daemon=True).start()
        self._engine = self._make_engine()
        postgresql = self._engine.dialect.name == "postgresql"
        self._insert_rows = _insert_postgresql if postgresql else _insert_sqlite
        self._replay_rows = _replay_postgresql if postgresql else _replay_sqlite
        self._checkpoints = _on_conflict_do_nothing(self._engine, AuditCheckpoint.__table__)
        self._scan_orphans()
        if self._orphans:
            self._replay()
        self._send_update()
        while True:
            spooling = self._spooled_entries() > 0
            batch, in_doubt, stop = self._take_batch(
                self._retry_s if spooling or self._in_doubt else _ORPHAN_SCAN_S)
            now = time.monotonic()
            if self._spool_dir is not None and now - self._last_orphan_scan >= _ORPHAN_SCAN_S:
                self._scan_orphans()  # a sibling replica on this directory may have been killed
            if spooling and now - self._last_attempt >= self._retry_s:
                self._replay()
            if in_doubt:
                if not self._in_doubt:
                    self._in_doubt_since = now
                self._in_doubt += in_doubt
            if self._in_doubt:
                batch = self._settle_in_doubt(give_up=stop) + batch
            if batch or stop or self._pending_checkpoints:
                self._persist_batch(batch, stop)
            self._send_update()
            if stop:
                self._shutdown()
                self._send_update()
                return

    def _shutdown(self) -> None:
        self._release_held(broken=False)
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

    # --- records a dead writer process may already have kept -----------------------

    def _settle_in_doubt(self, give_up: bool) -> list[_Item]:
        """Ack the in-doubt records already durable (in a spool file or the database) without linking
        them again; return the others, to be linked. While the database cannot be asked, the ones in no
        spool wait: the dead process may have committed them."""
        ids = {str(values[_ID_AT]) for _, values in self._in_doubt}
        spooled = spooled_ids(self._spool_dir) & ids  # first: a replay commits before it empties a spool
        found_spooled = [item for item in self._in_doubt if str(item[1][_ID_AT]) in spooled]
        self._ack(found_spooled, SPOOLED)
        self._in_doubt = [item for item in self._in_doubt if str(item[1][_ID_AT]) not in spooled]
        try:
            self._wait_for_dead_sessions()
            committed = self._ids_in_database(ids - spooled)
        except Exception as error:  # noqa: BLE001
            if self._in_doubt and (give_up or time.monotonic() - self._in_doubt_since >= IN_DOUBT_GIVE_UP_S):
                logger.error("audit database unavailable (%s): %d re-sent record(s) whose first writer may have "
                             "kept them are refused", database_error_name(error), len(self._in_doubt))
                self._ack(self._in_doubt, None)
                self._in_doubt = []
            return []
        found_committed = [item for item in self._in_doubt if str(item[1][_ID_AT]) in committed]
        unknown = [item for item in self._in_doubt if str(item[1][_ID_AT]) not in committed]
        self._ack(found_committed, COMMITTED)
        if found_committed or found_spooled:
            logger.warning("%d re-sent audit record(s) were already durable (their ack was lost): not linked "
                           "again", len(found_committed) + len(found_spooled))
        self._in_doubt = []
        return unknown

    def _wait_for_dead_sessions(self) -> None:
        """PostgreSQL: until the dead writer processes' sessions are gone, a COMMIT they had sent may
        still land; wait for them (bounded) so the id check sees the final state."""
        if self._engine.dialect.name != "postgresql" or not self._dead_chains:
            return
        names = [_application_name(chain_id) for chain_id in self._dead_chains]
        deadline = time.monotonic() + _DEAD_SESSION_WAIT_S
        with self._engine.connect() as connection:
            cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
            while time.monotonic() < deadline:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(%s)", (names,))
                if cursor.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
            connection.rollback()
        self._dead_chains = []

    def _ids_in_database(self, ids: set[str]) -> set[str]:
        found: set[str] = set()
        if not ids:
            return found
        wanted = sorted(ids)
        with self._engine.connect() as connection:
            cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                if self._engine.dialect.name == "postgresql":
                    cursor.execute("SELECT id::text FROM audit_records WHERE id = ANY(%s::uuid[])", (chunk,))
                    found.update(row[0] for row in cursor.fetchall())
                else:
                    hexes = {value.replace("-", ""): value for value in chunk}
                    cursor.execute(f"SELECT id FROM audit_records WHERE id IN ({', '.join('?' * len(hexes))})",
                                   list(hexes))
                    found.update(hexes[row[0]] for row in cursor.fetchall() if row[0] in hexes)
            connection.rollback()
        return found

    # --- persisting ----------------------------------------------------------------

    def _persist_batch(self, batch: list[_Item], stop: bool) -> None:
        chain = self._chain
        saved = (chain.seq, chain.last_hash, chain.since_checkpoint)
        records: list[list[Any]] = []
        link = chain.link_values
        try:
            records = [link(values, _LAYOUT) for _, values in batch]
            linked = batch
        except Exception:  # noqa: BLE001 - a malformed record: link one by one to refuse it alone
            chain.seq, chain.last_hash, chain.since_checkpoint = saved
            records, linked, refused = [], [], []
            for item in batch:
                # A malformed record (a bug upstream) is refused alone; it must not take the
                # writer down with it, or every later durable write would wait. A failed link
                # leaves the chain as it was.
                try:
                    records.append(link(item[1], _LAYOUT))
                except Exception as error:  # noqa: BLE001
                    logger.error("malformed audit record refused (%s)", type(error).__name__)
                    refused.append(item)
                else:
                    linked.append(item)
            self._ack(refused, None)
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
                database_error_name(error), len(linked),
            )
            self._ack(linked, None)
            return
        self._failing = False
        self._pending_checkpoints = []
        self._ack(linked, landed)

    def _persist(self, records: list[list[Any]], checkpoints: list[dict[str, Any]]) -> str:
        """COMMITTED or SPOOLED; raises when neither the database nor the spool took them."""
        if self._spooled_entries() == 0:
            started = time.perf_counter()
            try:
                self._insert(records, checkpoints)
                self._commits.append((len(records), False, time.perf_counter() - started))
                return COMMITTED
            except Exception as error:  # noqa: BLE001
                self._commits.append((len(records), True, time.perf_counter() - started))
                self._write_failures += 1
                self._last_attempt = time.monotonic()
                if self._spool_dir is None:
                    raise
                logger.error(
                    "audit database write failed (%s); spooling audit records to %s until it accepts them",
                    database_error_name(error), self._spool_dir,
                )
        if self._spool_dir is None:
            raise RuntimeError("audit records are spooled but no spool directory is set")
        if self._own_spool is None:
            self._own_spool = SpoolFile.create(self._spool_dir / f"{self._chain.chain_id}.jsonl")
        self._own_spool.append([dict(zip(ROW_COLUMNS, row)) for row in records], checkpoints)
        self._records_spooled += len(records)
        return SPOOLED

    def _insert(self, records: list[list[Any]], checkpoints: list[dict[str, Any]]) -> None:
        """On a driver connection held between batches: no pool check-out, pre-ping and reset-on-return
        round trips, nor SQLAlchemy's transaction bookkeeping, per batch. One idle for _HELD_IDLE_S goes
        back to the pool and the next batch checks one out (pre-pinged): a database restarted meanwhile
        costs no batch. One that failed is discarded."""
        held = self._held
        if held is not None and time.monotonic() - self._held_used > _HELD_IDLE_S:
            self._release_held(broken=False)
            held = None
        try:
            if held is None:
                held = self._held = self._engine.raw_connection()
                if self._engine.dialect.name == "postgresql":
                    held.driver_connection.rollback()  # type: ignore[union-attr] # whatever the pre-ping began
                    held.driver_connection.autocommit = True  # type: ignore[union-attr]
            self._insert_rows(held.driver_connection, records, checkpoints)
        except BaseException:
            self._release_held(broken=True)
            raise
        self._held_used = time.monotonic()
        self._records_committed += len(records)

    def _release_held(self, broken: bool) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        try:
            if broken:
                held.invalidate()  # its state is unknown: closed, not returned to the pool
            elif self._engine.dialect.name == "postgresql":
                held.driver_connection.autocommit = False  # type: ignore[union-attr] # as the pool hands them out
            held.close()
        except Exception:  # noqa: BLE001 - the connection is going away either way
            pass

    # --- spool replay --------------------------------------------------------------

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
                        records = [_row(row) for kind, row in chunk if kind == "r"]
                        checkpoints = [row for kind, row in chunk if kind == "c"]
                        if records:
                            self._replay_rows(connection, records)
                        if checkpoints:
                            connection.execute(self._checkpoints, checkpoints)
            except Exception as error:  # noqa: BLE001
                self._commits.append((spool.pending, True, time.perf_counter() - started))
                self._write_failures += 1
                logger.warning("audit spool replay still failing (%s); %d records wait in the spool",
                               database_error_name(error), self.spool_records)
                return
            replayed = spool.pending
            self._commits.append((replayed, False, time.perf_counter() - started))
            self._records_committed += replayed
            if spool is self._own_spool:
                spool.clear()
            else:
                spool.remove()
                self._orphans.remove(spool)
            logger.warning("audit database accepts writes again: replayed %d spooled records from %s",
                           replayed, spool.path.name)


def _application_name(chain_id: str) -> str:
    return f"medserve-audit {chain_id}"


def _die_with_parent(parent_pid: int, on_parent_death: Any) -> None:
    """SIGTERM when the replica dies, even if something else still holds our socket open (Linux)."""
    signal.signal(signal.SIGTERM, on_parent_death)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: EOF on the socket still tells us
        pass
    if os.getppid() != parent_pid:  # the replica died before prctl took effect
        on_parent_death()


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    forward = _ForwardingHandler()
    audit_logger = logging.getLogger("medserve.audit")
    audit_logger.addHandler(forward)
    audit_logger.setLevel(logging.INFO)
    audit_logger.propagate = False  # the replica logs them, once
    stream = sock.makefile("rb", buffering=1 << 20)
    try:
        _, config = read_frame(stream)
    except EOFError:
        return
    writer = WriterProcess(sock, stream, config, forward)
    _die_with_parent(config["parent_pid"], writer.stop_reading)
    writer.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))

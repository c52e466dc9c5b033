"""The replica's side of the audit writer: compact records out to a writer process, acks back.

Requests hand their record to :meth:`AuditWriter.write` and (with durability
"strict") wait until it is durable: committed to the database, or appended
and fsync'd to the writer's spool file when the database is unreachable, slow
or refusing writes. The hash chain, batching, inserts, commits, spooling,
replay and orphan adoption all run in a writer process of this replica's own
(:mod:`medserve.audit.writer_process`, which says why one per replica), so
they hold neither this process's GIL nor its CPU.

What stays here is cheap: a record dict becomes a tuple in column order, gets
a sequence number and joins an outbox; once per event-loop tick a sender
thread is woken to pickle the outbox into one frame. A receiver thread reads
the acks, resolves the waiting futures with one ``call_soon_threadsafe`` per
event loop per ack, and records the commit metrics and log lines the process
reported.

When the writer process dies (EOF on its socket), the receiver reaps it,
starts a new one and re-sends every record not yet acked, flagged "in doubt":
the new process acks those its predecessor already made durable without
linking them again (see writer_process's docstring), so every answered record
lands exactly once and the chains still verify.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import medserve
from medserve import metrics
from medserve.audit.spool import SpoolFile
from medserve.audit.writer_process import COMMITTED, INPUT_COLUMNS, SPOOLED, read_frame, send_frame
from medserve.errors import AuditUnavailableError

__all__ = ["COMMITTED", "SPOOLED", "AuditWriter", "SpoolFile"]

logger = logging.getLogger("medserve.audit")

_input_values = operator.itemgetter(*INPUT_COLUMNS)
_ID_AT, _SHADOW_OF_AT = INPUT_COLUMNS.index("id"), INPUT_COLUMNS.index("shadow_of")
# A writer process that dies this many times in a row without acking anything is not coming back soon:
# the records waiting on it are refused instead of holding their requests.
_CRASH_LOOP = 3
_PLATFORM_DIR = str(Path(medserve.__file__).resolve().parent.parent)
# One frame is on its way to the writer process at a time; the records produced meanwhile leave
# together when it is acknowledged, or after this long in any case (a record the process holds
# for long, say during a database outage, must not hold back the others).
_HOLD_S = 0.05


def _compact(record: dict[str, Any]) -> list[Any]:
    """The record as values in INPUT_COLUMNS order; UUIDs as text (a str pickles several times faster)."""
    try:
        values = list(_input_values(record))
    except KeyError:  # a partial record: absent columns are NULL
        values = [record.get(name) for name in INPUT_COLUMNS]
    if isinstance(values[_ID_AT], uuid.UUID):
        values[_ID_AT] = str(values[_ID_AT])
    if values[_SHADOW_OF_AT] is not None:
        values[_SHADOW_OF_AT] = str(values[_SHADOW_OF_AT])
    return values


def _resolve(outcomes: list[tuple[asyncio.Future[str | None], str | None]]) -> None:
    for future, outcome in outcomes:
        if not future.done():
            future.set_result(outcome)


# (compact record, the producer's event loop, its future or None when it does not wait)
_Pending = tuple[list[Any], asyncio.AbstractEventLoop, "asyncio.Future[str | None] | None"]


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
        self._config: dict[str, Any] = {
            "database_url": database_url, "signing_key": signing_key, "batch_max": batch_max,
            "spool_dir": str(spool_dir) if spool_dir is not None else None,
            "checkpoint_every": checkpoint_every, "retry_s": retry_s, "db_timeout_s": db_timeout_s,
        }
        self._queue_max = queue_max
        self._chain_id = str(uuid.uuid4())
        # Guards everything below that both threads and the producers touch.
        self._lock = threading.Condition()
        self._pending: dict[int, _Pending] = {}  # not yet acked, in sequence order
        self._outbox: list[tuple[int, list[Any]]] = []
        self._next_seqno = 0
        self._wake_scheduled = False
        self._sent_at = 0.0  # when the last frame of records left
        self._sock: socket.socket | None = None
        self._resend = False
        self._shut_down_socket: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # (spool_records, spooled_entries, failing, write_failures, records_committed, records_spooled),
        # as the current writer process last reported them; the dead ones' counters are added in _base.
        self._stats: tuple[Any, ...] = (0, 0, False, 0, 0, 0)
        self._base = [0, 0, 0]
        self._closed = False
        self._finished = False
        self._supervisor = threading.Thread(target=self._supervise, name="medserve-audit-link", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="medserve-audit-send", daemon=True)
        self._supervisor.start()
        self._sender.start()

    # --- metrics -----------------------------------------------------------------

    @property
    def chain_id(self) -> str:
        """The current writer process's chain (a new one after a restart)."""
        return self._chain_id

    @property
    def process_id(self) -> int | None:
        """The writer process's pid (diagnostics, tests)."""
        process = self._process
        return process.pid if process is not None else None

    @property
    def queue_depth(self) -> int:
        """Records handed to the writer and not yet acknowledged by its process."""
        return len(self._pending)

    @property
    def spool_records(self) -> int:
        """Records durable only in spool files (this writer's and adopted ones), not yet in the database."""
        return self._stats[0]

    @property
    def spooling(self) -> bool:
        """True while a spool holds entries: every new record goes to the spool until the replay."""
        return self._stats[1] > 0

    @property
    def failing(self) -> bool:
        """True when the last batch could be made durable neither in the database nor in the spool."""
        return self._stats[2]

    @property
    def write_failures(self) -> int:
        """Database writes (batches or replays) that failed since start; each one is logged."""
        return self._base[0] + self._stats[3]

    @property
    def records_committed(self) -> int:
        """Records this writer put in the database, directly or by replay."""
        return self._base[1] + self._stats[4]

    @property
    def records_spooled(self) -> int:
        """Records this writer ever had to spool."""
        return self._base[2] + self._stats[5]

    # --- producers ---------------------------------------------------------------

    async def write(self, record: dict[str, Any] | list[Any], *, durable: bool) -> str | None:
        """Queue a record (a dict keyed by column, or already its values in INPUT_COLUMNS order with ids
        as text, as ``AuditScope.to_values`` gives it); with durable=True return only once it is committed
        or spooled, and say which (COMMITTED or SPOOLED; None for a record not waited on).

        Raises AuditUnavailableError when a durable record could be neither.
        """
        if self._closed:
            raise AuditUnavailableError("the audit writer is shut down")
        while len(self._pending) >= self._queue_max:  # back-pressure instead of dropping
            await asyncio.sleep(0.005)
            if self._closed:
                raise AuditUnavailableError("the audit writer is shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] | None = loop.create_future() if durable else None
        values = record if isinstance(record, list) else _compact(record)
        with self._lock:
            seqno = self._next_seqno = self._next_seqno + 1
            self._pending[seqno] = (values, loop, future)
            self._outbox.append((seqno, values))
            # One wake-up of the sender per event-loop tick, however many records it produced,
            # and none while a frame is on its way: the acknowledgement wakes it then.
            wake = not self._wake_scheduled and not self._in_flight()
            if wake:
                self._wake_scheduled = True
        if wake:
            loop.call_soon(self._wake_sender)
        if future is None:
            return None
        landed = await future
        if landed is None:
            raise AuditUnavailableError()
        return landed

    def _wake_sender(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            self._lock.notify_all()

    def _in_flight(self) -> bool:
        """Records sent and not yet acknowledged (call with the lock held): pending ones not in the outbox."""
        return len(self._pending) > len(self._outbox)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued (to the database or the spool), checkpoint, then stop the writer process."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._supervisor.join(timeout)
        if self._supervisor.is_alive():
            logger.error("audit writer process did not finish within %.0f s", timeout)
            process = self._process
            if process is not None and process.poll() is None:
                process.terminate()  # SIGTERM: it stops reading, drains what it has and exits

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or spooled (tests, shutdown hooks); True when reached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and self._stats[1] == 0:
                return True
            time.sleep(0.05)
        return False

    # --- the sender thread -------------------------------------------------------

    def _send_loop(self) -> None:
        """The only thread that writes to the socket, so frames keep sequence order.

        Records go out as one frame at a time (see _HOLD_S): under load the
        records of many event-loop ticks share a frame, an acknowledgement and
        one wake-up of each side, as group commits share an fsync; a lone record
        still leaves at once.
        """
        while True:
            with self._lock:
                while (wait_s := self._sender_wait_s()) != 0:
                    self._lock.wait(wait_s)
                if self._finished:
                    return
                sock = self._sock
                if self._resend:
                    kind, items = "in_doubt", [(seqno, entry[0]) for seqno, entry in self._pending.items()]
                    self._resend = False
                else:
                    kind, items = "records", self._outbox
                self._outbox = []
                self._sent_at = time.monotonic()
                # After everything queued so far: EOF tells the process to drain, checkpoint and exit.
                shut_down = self._closed and not self._outbox
                if shut_down:
                    self._shut_down_socket = sock
            assert sock is not None
            try:
                if items:
                    self._send_records(sock, kind, items)
                if shut_down:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the process died: the supervisor restarts it and everything unacked is re-sent

    def _sender_wait_s(self) -> float | None:
        """With the lock held: 0 when the sender has work now, else how long to wait (None: until woken)."""
        if self._finished:
            return 0
        if self._sock is None:
            return None
        if self._resend or (self._closed and self._shut_down_socket is not self._sock):
            return 0
        if not self._outbox:
            return None
        if self._closed or not self._in_flight():
            return 0
        return max(0.0, _HOLD_S - (time.monotonic() - self._sent_at))

    def _send_records(self, sock: socket.socket, kind: str, items: list[tuple[int, list[Any]]]) -> None:
        try:
            send_frame(sock, (kind, items))
        except (pickle.PicklingError, TypeError, AttributeError):
            # A value that cannot travel (a bug upstream): refuse that record alone.
            good = []
            for item in items:
                try:
                    pickle.dumps(item)
                except Exception:  # noqa: BLE001
                    logger.error("malformed audit record refused (a value cannot be sent to the writer process)")
                    self._settle([(None, [item[0]])])
                else:
                    good.append(item)
            if good:
                send_frame(sock, (kind, good))

    # --- the supervisor thread: spawn, read acks, restart ---------------------------

    def _spawn(self, dead_chains: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [_PLATFORM_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            # Spawned from this long-lived thread: PR_SET_PDEATHSIG follows the thread that forked.
            process = subprocess.Popen(
                [sys.executable, "-m", "medserve.audit.writer_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        # The configuration travels on the socket, not the command line: it holds the signing key.
        send_frame(ours, ("config", {**self._config, "chain_id": self._chain_id, "parent_pid": os.getpid(),
                                     "dead_chain_ids": dead_chains}))
        return process, ours

    def _supervise(self) -> None:
        dead_chains: list[str] = []
        fruitless = 0
        first = True
        while True:
            try:
                process, sock = self._spawn(dead_chains)
            except OSError as error:
                logger.error("audit writer process could not start (%s)", type(error).__name__)
                process, sock = None, None
            acked = False
            if process is not None and sock is not None:
                self._process = process
                with self._lock:
                    self._sock = sock
                    self._resend = not first and bool(self._pending)
                    self._lock.notify_all()
                first = False
                acked = self._read_acks(sock)
                process.wait()
                with self._lock:
                    self._sock = None
                sock.close()
            with self._lock:
                stats, self._stats = self._stats, (0, 0, False, 0, 0, 0)
                self._base = [self._base[0] + stats[3], self._base[1] + stats[4], self._base[2] + stats[5]]
                if self._closed and not self._pending:
                    self._finished = True
                    self._lock.notify_all()
                    return
            fruitless = 0 if acked else fruitless + 1
            code = process.returncode if process is not None else None
            logger.error("audit writer process exited (code %s) with %d record(s) unacknowledged: restarting it "
                         "and re-sending them", code, len(self._pending))
            if fruitless >= _CRASH_LOOP:
                self._refuse_pending()
                if self._closed:
                    with self._lock:
                        self._finished = True
                        self._lock.notify_all()
                    return
            time.sleep(min(0.2 * fruitless, 2.0))
            # Its sessions must be gone before the successor checks which re-sent records it kept.
            dead_chains = [*dead_chains[-8:], self._chain_id]
            self._chain_id = str(uuid.uuid4())

    def _read_acks(self, sock: socket.socket) -> bool:
        """Until EOF; True when any record was acked."""
        stream = sock.makefile("rb", buffering=1 << 20)
        acked = False
        try:
            while True:
                _, acks, stats, commits, lines = read_frame(stream)
                for level, text in lines:
                    logger.log(level, "%s", text)  # already free of record content, formatted by the process
                for records, failed, duration_s in commits:
                    metrics.record_audit_commit(records=records, failed=failed, duration_s=duration_s)
                self._stats = stats
                if acks:
                    acked = True
                    self._settle(acks)
        except (EOFError, OSError):
            pass
        return acked

    def _settle(self, acks: list[tuple[str | None, list[int]]]) -> None:
        """Wake the waiting producers: one thread-safe call per event loop, not one per record."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str | None], str | None]]] = (
            defaultdict(list))
        with self._lock:
            for outcome, seqnos in acks:
                for seqno in seqnos:
                    entry = self._pending.pop(seqno, None)
                    if entry is not None and entry[2] is not None:
                        by_loop[entry[1]].append((entry[2], outcome))
            if self._outbox and not self._in_flight():
                self._lock.notify_all()  # the frame is home: what gathered meanwhile leaves now
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcomes)
            except RuntimeError:  # the producer's loop is gone: nobody waits any more
                pass

    def _refuse_pending(self) -> None:
        with self._lock:
            seqnos = list(self._pending)
            self._outbox = []
            self._resend = False
        if seqnos:
            logger.error("audit writer process keeps failing: %d request(s) refused", len(seqnos))
            self._settle([(None, seqnos)])

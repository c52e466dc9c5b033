"""Batched audit writer: one background thread per process, bulk inserts.

Requests hand their record to a bounded queue and (with durability "strict")
wait for the commit that contains it; the thread commits whatever has piled up
in one Core bulk insert, so throughput grows with load instead of paying one
transaction per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from sqlalchemy import insert

from medserve import metrics
from medserve.db.engine import get_engine
from medserve.db.models import AuditRecord
from medserve.errors import AuditUnavailableError

logger = logging.getLogger("medserve.audit")

_STOP = object()


class AuditWriter:
    def __init__(self, database_url: str, *, batch_max: int = 500, queue_max: int = 20_000) -> None:
        self._database_url = database_url
        self._batch_max = batch_max
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._thread = threading.Thread(target=self._run, name="medserve-audit-writer", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def write(self, record: dict[str, Any], *, durable: bool) -> None:
        """Queue a record; with durable=True return only once it is committed.

        Raises AuditUnavailableError when a durable record could not be committed.
        """
        future: Future[None] = Future()
        item = (record, future)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # Back-pressure instead of dropping: the caller waits for room.
            await asyncio.to_thread(self._queue.put, item)
        if durable:
            try:
                await asyncio.wrap_future(future)
            except Exception:  # noqa: BLE001 - the cause is logged by the writer thread
                raise AuditUnavailableError() from None

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _take_batch(self) -> tuple[list[tuple[dict[str, Any], Future[None]]], bool]:
        first = self._queue.get()
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
        engine = get_engine(self._database_url)
        table = AuditRecord.__table__
        while True:
            batch, stop = self._take_batch()
            if batch:
                started = time.perf_counter()
                try:
                    with engine.begin() as connection:
                        connection.execute(insert(table), [record for record, _ in batch])
                except Exception as error:  # noqa: BLE001
                    logger.error("audit write of %d records failed: %s", len(batch), type(error).__name__)
                    metrics.record_audit_commit(records=len(batch), failed=True,
                                                duration_s=time.perf_counter() - started)
                    for _, future in batch:
                        future.set_exception(error)
                else:
                    metrics.record_audit_commit(records=len(batch), failed=False,
                                                duration_s=time.perf_counter() - started)
                    for _, future in batch:
                        future.set_result(None)
            if stop:
                return

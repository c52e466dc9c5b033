"""Exactly one audit record per inference request, whatever happens in it.

A route wraps its whole body in ``async with recorder.scope(...) as audit``;
the route fills in what it learns (caller, model, digests, tokens) and the
scope writes the record on the way out, answered or refused. With strict
durability a failed write turns a success into 503 audit_unavailable: an
answer that cannot be accounted for is not given.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from medserve import metrics
from medserve.audit.writer import AuditWriter
from medserve.audit.writer_process import INPUT_COLUMNS
from medserve.catalog import CatalogEntry
from medserve.db.models import utcnow
from medserve.errors import AuditUnavailableError, AuthenticationError, MedserveError, PermissionDeniedError
from medserve.gateway.errors import known_error
from medserve.security.api_keys import Principal
from medserve.security.pseudonyms import pseudonymize_headers

logger = logging.getLogger("medserve.gateway.audit")

# The scope of the request being handled, so authentication can name the
# caller in the record even when it then refuses them (403, 429).
current_scope: contextvars.ContextVar["AuditScope | None"] = contextvars.ContextVar("medserve_audit", default=None)


# A hex digit's top two bits replaced by RFC 9562's variant (binary 10): the 17th digit of the UUID.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class _RecordIds(threading.local):
    """Time-ordered (version 7, RFC 9562) UUIDs, as text: 48 bits of Unix milliseconds, then 74
    random bits cut from one ``os.urandom`` read per 256 ids, per thread.

    Why time-ordered: the id is the audit table's primary key, and a random
    (version 4) key puts each new row on a random leaf of that index, so every
    group commit rewrote about one index page per record, and more of them
    as the table grew. Measured on the development machine's disk, SQLite
    with synchronous=FULL, 32 records per commit: 1.51 ms per commit with
    random ids on an empty table, 2.00 ms at 200,000 rows; time-ordered,
    1.21 and 1.17 ms. A strict request waits for that commit. PostgreSQL's
    B-tree gains the same locality. The time an id carries is the record's
    own created_at, to the millisecond; the 74 random bits keep ids of the
    same millisecond unguessable and unique.

    Why batched reads: ``os.urandom`` per id releases the GIL, and under load
    the event loop then waited for it behind the audit writer or Ray's
    threads (up to the interpreter's 5 ms switch interval) on every request.
    The ids are written straight from the bytes' hex, version and variant
    digits set in place: the hot routes need only the text (the record, the
    answer, its header), and building a ``uuid.UUID`` to format it cost 1.9 µs.
    """

    _BATCH = 256

    def __init__(self) -> None:
        self.buffer = b""
        self.offset = 0

    def next_text(self) -> str:
        if self.offset >= len(self.buffer):
            self.buffer, self.offset = os.urandom(10 * self._BATCH), 0
        start = self.offset
        self.offset = start + 10
        random = self.buffer[start:start + 10].hex()
        stamp = f"{time.time_ns() // 1_000_000:012x}"
        return (f"{stamp[:8]}-{stamp[8:]}-7{random[:3]}-{_VARIANT_DIGIT[random[3]]}{random[4:7]}-"
                f"{random[8:]}")


_record_ids = _RecordIds()


def new_record_id() -> uuid.UUID:
    """A new audit record id (and inference id): a time-ordered version 7 UUID."""
    return uuid.UUID(_record_ids.next_text())


class AuditScope:
    """What one request's audit record will say; routes fill it in as they go.

    A plain class whose optional fields default at class level: a hot request
    sets only the few it learns, where a dataclass's ``__init__`` assigned all
    twenty and called four default factories on every request.
    """

    # What the request learns, set by the route as it goes (None until then).
    principal: Principal | None = None
    entry: CatalogEntry | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_sha256: str | None = None
    finish_reason: str | None = None
    # Rollouts: the arm that answered, the candidate to mirror to (never
    # returned), and for a mirrored call's own record, the answered request.
    rollout: str | None = None
    shadow_entry: CatalogEntry | None = None
    shadow_of: uuid.UUID | None = None
    output_label: str | None = None
    # Where the record landed once written with strict durability: "committed" to the
    # database, or "spooled" (durable on the gateway's disk, replayed when the database returns).
    landed: str | None = None
    # Timing hooks for metrics (not stored whole): seconds from the request's
    # arrival to its first generated token, and between successive tokens.
    time_to_first_token_s: float | None = None
    inter_token_latencies_s: list[float]
    _last_token_at: float | None = None
    # Set by the streaming route: the time-to-first-token metric is labelled with it.
    streamed: bool = False

    def __init__(self, operation: str, model_name: str | None, *, id: uuid.UUID | None = None,
                 context: dict[str, str | None] | None = None, **learned: Any) -> None:
        """``id``: the record's own (a console event passes its own), else a new one. ``context``: the
        clinical context's pseudonyms. ``learned``: any of the fields above, known already."""
        self.operation = operation
        self.model_name = model_name
        # The id is kept as text, the form the record and the answer take; ``id`` gives the UUID.
        self.id_text = _record_ids.next_text() if id is None else str(id)
        self.context = {} if context is None else context
        self.started = time.perf_counter()
        self.inter_token_latencies_s = []
        for name, value in learned.items():
            if name not in _LEARNED_FIELDS:
                raise TypeError(f"AuditScope has no field {name!r}")
            setattr(self, name, value)

    @functools.cached_property
    def id(self) -> uuid.UUID:
        """The record id (the inference id callers see) as a UUID."""
        return uuid.UUID(self.id_text)

    def shadow_scope(self, entry: CatalogEntry) -> "AuditScope":
        """The record of a mirrored call: same caller, input and context, its own id and version."""
        return AuditScope(
            operation=self.operation,
            model_name=self.model_name,
            principal=self.principal,
            entry=entry,
            input_sha256=self.input_sha256,
            context=dict(self.context),
            rollout="shadow",
            shadow_of=self.id,
        )

    def observe_tokens(self, count: int, now: float | None = None) -> None:
        """Record that count generated tokens arrived now (together: their gap is shared evenly)."""
        if count <= 0:
            return
        now = time.perf_counter() if now is None else now
        if self._last_token_at is None:
            self.time_to_first_token_s = now - self.started
            count -= 1
        else:
            gap = (now - self._last_token_at) / count
            self.inter_token_latencies_s.extend([gap] * count)
            count = 0
        if count > 0:  # the first arrival carried more than one token
            self.inter_token_latencies_s.extend([0.0] * count)
        self._last_token_at = now

    def to_values(self, http_status: int, error_code: str | None, outcome: str) -> list[Any]:
        """The record as the audit writer takes it: values in ``INPUT_COLUMNS`` order, ids as text.

        The hot routes hand this to the writer directly: a record dict costs a
        dict of 29 keys and then a pass to put them back in column order, on
        every request. The list follows the table's columns by position;
        tests/unit/test_audit_writer.py checks every column by name.
        """
        principal, entry, context = self.principal, self.entry, self.context
        if principal is not None:
            key_id, caller, role, department = principal.key_id, principal.name, principal.role.value, principal.department
        else:
            key_id = caller = role = department = None
        if entry is not None:
            model, version, artifact = entry.model_name, entry.model_version, entry.artifact_sha256
        else:
            model, version, artifact = (self.model_name or "")[:100] or None, None, None
        ttft = self.time_to_first_token_s
        return [
            self.id_text, utcnow(), key_id, caller, role, department, model, version, artifact,
            self.operation, outcome, http_status, error_code,
            round((time.perf_counter() - self.started) * 1000.0, 3),
            self.input_sha256, self.output_sha256, self.prompt_tokens, self.completion_tokens,
            self.reasoning_sha256, None if ttft is None else round(ttft * 1000.0, 3), self.finish_reason,
            context.get("patient"), context.get("encounter"), context.get("clinician"), context.get("purpose"),
            self.rollout, self.shadow_of is not None, None if self.shadow_of is None else str(self.shadow_of),
            self.output_label,
        ]

    def to_record(self, http_status: int, error_code: str | None, outcome: str) -> dict[str, Any]:
        """The record as a dict keyed by column (ids as UUIDs): for records inspected or built on."""
        record = dict(zip(INPUT_COLUMNS, self.to_values(http_status, error_code, outcome)))
        record["id"] = self.id
        record["shadow_of"] = self.shadow_of
        return record


# The fields a caller may pass to AuditScope as known already: the class's annotated, public ones.
_LEARNED_FIELDS = frozenset(name for name in AuditScope.__annotations__ if not name.startswith("_"))


def _record_metrics(audit: AuditScope, http_status: int) -> None:
    """Request metrics once the record is written (so latency includes the audit commit).

    Labels stay bounded: model and version come from the catalog entry only,
    never from what the caller asked for.
    """
    entry, principal = audit.entry, audit.principal
    model = entry.model_name if entry else None
    version = entry.model_version if entry else None
    duration_s = time.perf_counter() - audit.started
    metrics.record_request(
        model=model, version=version, operation=audit.operation, status=http_status,
        department=principal.department if principal else None, duration_s=duration_s,
    )
    if entry is not None and entry.task == "llm":
        metrics.record_tokens(model=entry.model_name, version=entry.model_version,
                              prompt=audit.prompt_tokens, completion=audit.completion_tokens)
        if http_status == 200 and audit.time_to_first_token_s is not None:
            # Streams measure it at the gateway as tokens arrive; whole answers
            # carry the replica's own measurement.
            metrics.observe_time_to_first_token(
                entry.model_name, entry.model_version, audit.time_to_first_token_s, streamed=audit.streamed
            )
        for gap in audit.inter_token_latencies_s:
            metrics.observe_inter_token_latency(entry.model_name, entry.model_version, gap)


def _outcome_of(error: MedserveError) -> str:
    if isinstance(error, (AuthenticationError, PermissionDeniedError)):
        return "denied"
    return "error"


class AuditRecorder:
    def __init__(self, writer: AuditWriter, pseudonym_key: bytes, *, durable: bool) -> None:
        self._writer = writer
        self._pseudonym_key = pseudonym_key
        self._durable = durable

    @property
    def pseudonym_key(self) -> bytes:
        return self._pseudonym_key

    def scope(self, operation: str, model_name: str | None, headers: Mapping[str, str]) -> "_RecordedScope":
        """``async with recorder.scope(...) as audit``: the request's record, written on the way out."""
        return _RecordedScope(self, operation, model_name, headers)

    async def _close(self, audit: AuditScope, error: BaseException | None) -> None:
        """Write the record of a request that ended (``error`` None: answered). Re-raises nothing
        itself except the typed error a known infrastructure failure becomes, and
        AuditUnavailableError when an answer's record cannot be written."""
        if error is None:
            values = audit.to_values(200, None, "ok")
            try:
                audit.landed = await self._writer.write(values, durable=self._durable)
            except AuditUnavailableError as unavailable:
                # The answer is withheld: count what the caller gets (503).
                _record_metrics(audit, unavailable.http_status)
                raise
            _record_metrics(audit, 200)
            return
        if isinstance(error, MedserveError):
            record = audit.to_record(error.http_status, error.code, _outcome_of(error))
            await asyncio.shield(self._write_quietly(record))
            _record_metrics(audit, record["http_status"])
            return
        known = known_error(error)
        if known is not None:
            # An infrastructure failure with a typed error (the database went away mid-request):
            # recorded and answered as that error, never as a bare 500.
            record = audit.to_record(known.http_status, known.code, "error")
            await asyncio.shield(self._write_quietly(record))
            _record_metrics(audit, record["http_status"])
            raise known from None
        # CancelledError: the client went away before the answer. GeneratorExit:
        # a streamed answer's generator was closed before its end (same cause).
        cancelled = isinstance(error, (asyncio.CancelledError, GeneratorExit))
        if cancelled:
            audit.finish_reason = "cancelled"
        record = audit.to_record(499 if cancelled else 500, None if cancelled else "internal_error",
                                 "cancelled" if cancelled else "error")
        # Shielded: a second cancellation must not lose the record.
        await asyncio.shield(self._write_quietly(record))
        _record_metrics(audit, record["http_status"])

    async def write(self, record: dict[str, Any]) -> str | None:
        """A record of the gateway's own (a console event) with the configured durability; where it
        landed (strict), or AuditUnavailableError."""
        return await self._writer.write(record, durable=self._durable)

    async def write_shadow(self, record: dict[str, Any]) -> None:
        """A shadow call's record: never delays or fails the answered request."""
        try:
            await self._writer.write(record, durable=False)
        except AuditUnavailableError:
            logger.error("audit record %s for a shadow call could not be written", record["id"])

    async def _write_quietly(self, record: dict[str, Any]) -> None:
        try:
            await self._writer.write(record, durable=self._durable)
        except AuditUnavailableError:
            logger.error("audit record %s for a failed request could not be written", record["id"])


class _RecordedScope:
    """The async context manager ``AuditRecorder.scope`` returns.

    A class rather than ``@asynccontextmanager``: on the hot routes the
    generator-based form (a generator, its frames and ``athrow`` per
    request) was among medserve's own largest costs in the replica.
    """

    __slots__ = ("_recorder", "_audit", "_token")

    def __init__(self, recorder: AuditRecorder, operation: str, model_name: str | None,
                 headers: Mapping[str, str]) -> None:
        self._recorder = recorder
        self._audit = AuditScope(operation, model_name,
                                 context=pseudonymize_headers(recorder.pseudonym_key, headers))

    async def __aenter__(self) -> AuditScope:
        self._token = current_scope.set(self._audit)
        return self._audit

    async def __aexit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        try:
            await self._recorder._close(self._audit, error)
        finally:
            try:
                current_scope.reset(self._token)
            except ValueError:  # closed from another context (a streamed response's task)
                pass
        return False  # the request's own exception, if any, goes on to the caller

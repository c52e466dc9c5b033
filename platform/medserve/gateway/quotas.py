"""Quotas and fairness in one gateway replica.

- Request rates per key and per department: a token bucket per replica,
  each replica enforcing its share (the configured rate divided by the
  number of gateway replicas, which the control plane passes in).
- LLM token budgets per UTC day, shared across replicas through the audit
  table (which already counts every call's tokens): a short per-replica
  cache of today's sum plus the tokens this replica has seen since.
- Priority classes: a per-model gate bounds the requests in flight to the
  model's capacity; when it is full, waiting requests are admitted
  emergency first, research last (first come, first served within a class).

Refusals are RateLimitedError / TokenBudgetExceededError (429 with
Retry-After), raised inside the route's audit scope so each one leaves its row.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from medserve import metrics

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.errors import ModelOverloadedError, RateLimitedError, TokenBudgetExceededError
from medserve.security.api_keys import Principal

logger = logging.getLogger("medserve.gateway.quotas")

PRIORITY_ORDER = {"emergency": 0, "standard": 1, "research": 2}


# --- request rates --------------------------------------------------------------


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float = field(default=-1.0)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def take(self, now: float | None = None) -> float:
        """0.0 when a request may go now, else the seconds until one may."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets per key and per department, sized to this replica's share.

    A key's own limit (``Principal.rate_limit_rps``; 0: none) replaces the
    default per-key rate; ``departments`` replaces the default department rate
    for the departments it names.
    """

    def __init__(
        self,
        key_rps: float | None,
        department_rps: float | None,
        *,
        departments: dict[str, float] | None = None,
        replicas: int = 1,
        burst_seconds: float = 1.0,
        max_buckets: int = 50_000,
    ) -> None:
        self._replicas = replicas
        self._key_rps = key_rps / replicas if key_rps else None
        self._department_rps = department_rps / replicas if department_rps else None
        self._departments = {name: rps / replicas for name, rps in (departments or {}).items() if rps}
        self._burst = burst_seconds
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, kind: str, name: str, rate: float, now: float) -> TokenBucket:
        bucket = self._buckets.get((kind, name))
        if bucket is None or bucket.rate != rate:
            if len(self._buckets) >= self._max_buckets:
                self._buckets.clear()  # bound memory; a reset only ever forgives
            bucket = TokenBucket(rate=rate, capacity=max(1.0, rate * self._burst), updated=now)
            self._buckets[(kind, name)] = bucket
        return bucket

    def key_rate(self, principal: Principal) -> float | None:
        """This replica's share of the caller's request rate (None: unlimited)."""
        own = principal.rate_limit_rps
        if own is None:
            return self._key_rps
        return own / self._replicas if own else None

    def check(self, principal: Principal, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key_rate = self.key_rate(principal)
        if key_rate:
            self._take("key", principal.key_id, key_rate, now)
        department = principal.department
        if department:
            department_rate = self._departments.get(department, self._department_rps)
            if department_rate:
                self._take("department", department, department_rate, now)

    def _take(self, kind: str, name: str, rate: float, now: float) -> None:
        wait = self._bucket(kind, name, rate, now).take(now)
        if wait > 0:
            raise RateLimitedError(limit=kind, retry_after_s=math.ceil(wait * 1000) / 1000)


# --- daily token budgets -----------------------------------------------------------


def _day_start(now: datetime) -> datetime:
    return now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


class TokenBudget:
    """Tokens used today per key and per department: audit-table sum, cached, plus local increments."""

    def __init__(
        self,
        database_url: str,
        key_per_day: int | None,
        department_per_day: int | None,
        *,
        cache_seconds: float = 10.0,
    ) -> None:
        self._database_url = database_url
        self._key_per_day = key_per_day
        self._department_per_day = department_per_day
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        # (kind, name) -> (monotonic time of the sum, day, tokens in the table then, tokens added locally since)
        self._used: dict[tuple[str, str], tuple[float, datetime, int, int]] = {}
        self._failing = False  # logged once per outage

    @property
    def enabled(self) -> bool:
        return bool(self._key_per_day or self._department_per_day)

    def _sum_from_audit(self, kind: str, name: str, since: datetime) -> int:
        column = AuditRecord.api_key_id if kind == "key" else AuditRecord.department
        tokens = func.coalesce(AuditRecord.prompt_tokens, 0) + func.coalesce(AuditRecord.completion_tokens, 0)
        with session_scope(self._database_url) as session:
            query = select(func.coalesce(func.sum(tokens), 0)).where(column == name, AuditRecord.created_at >= since)
            return int(session.scalar(query) or 0)

    def used(self, kind: str, name: str, now: datetime | None = None) -> int:
        now = now or datetime.now(timezone.utc)
        day = _day_start(now)
        with self._lock:
            cached = self._used.get((kind, name))
        if cached is not None and cached[1] == day and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[2] + cached[3]
        try:
            total, added = self._sum_from_audit(kind, name, day), 0
        except SQLAlchemyError:
            # The database is down: a budget is a fairness control, not a safety one, so the
            # request is judged on the last known sum (0 when none) plus what this replica
            # counted since, and the sum is asked again after the next cache window.
            metrics.record_state_refresh_failure("token_usage")
            if not self._failing:
                self._failing = True
                logger.warning("could not read today's token use from the audit table; using the last known sums")
            same_day = cached is not None and cached[1] == day
            total, added = (cached[2], cached[3]) if same_day else (0, 0)
        else:
            self._failing = False
        with self._lock:
            self._used[(kind, name)] = (time.monotonic(), day, total, added)
        return total + added

    def _limits(self, principal: Principal) -> list[tuple[str, str, int]]:
        limits: list[tuple[str, str, int]] = []
        if self._key_per_day:
            limits.append(("key", principal.key_id, self._key_per_day))
        if self._department_per_day and principal.department:
            limits.append(("department", principal.department, self._department_per_day))
        return limits

    def check(self, principal: Principal, now: datetime | None = None) -> None:
        """Blocking (a database query at most once per cache window): call it off the event loop."""
        now = now or datetime.now(timezone.utc)
        for kind, name, limit in self._limits(principal):
            if self.used(kind, name, now) >= limit:
                tomorrow = _day_start(now) + timedelta(days=1)
                raise TokenBudgetExceededError(
                    limit=kind, budget=limit, retry_after_s=math.ceil((tomorrow - now).total_seconds())
                )

    def add(self, principal: Principal, tokens: int) -> None:
        """Count tokens this replica just spent (the audit row may not be committed yet)."""
        with self._lock:
            for kind, name, _ in self._limits(principal):
                cached = self._used.get((kind, name))
                if cached is not None:
                    self._used[(kind, name)] = (cached[0], cached[1], cached[2], cached[3] + tokens)


# --- priority classes ----------------------------------------------------------------


class PriorityGate:
    """At most ``capacity`` requests in flight; waiters admitted by (class, arrival)."""

    def __init__(self, capacity: int, *, max_waiting: int | None = None, model: str | None = None) -> None:
        self.capacity = max(1, capacity)
        # Beyond this many waiters a request is refused at once (503 with
        # Retry-After) instead of waiting towards its timeout. None: unbounded.
        self.max_waiting = max_waiting
        self.model = model
        self.in_flight = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    @property
    def waiting(self) -> int:
        if not self._waiters:  # the common case, checked on every request
            return 0
        return sum(1 for *_, future in self._waiters if not future.done())

    def enter_now(self) -> bool:
        """Take a slot if one is free and nobody waits (no await: the common case); True when taken."""
        if self.in_flight < self.capacity and not self.waiting:
            self.in_flight += 1
            return True
        return False

    async def wait(self, priority_class: str) -> None:
        """Wait for a slot (after ``enter_now`` said no); 503 model_overloaded when too many wait."""
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            raise ModelOverloadedError(model=self.model)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (PRIORITY_ORDER.get(priority_class, 1), next(self._counter), future))
        try:
            await future  # the releaser hands its slot over: in_flight stays counted
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    @asynccontextmanager
    async def slot(self, priority_class: str) -> AsyncIterator[None]:
        if not self.enter_now():
            await self.wait(priority_class)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Give a slot back (to the first waiter by class and arrival, if any)."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self.in_flight -= 1


def priority_class(department: str | None, classes: dict[str, str]) -> str:
    return classes.get(department or "", "standard")

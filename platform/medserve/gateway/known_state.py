"""Last-known-good copies of what the request path needs from the database.

A gateway replica answers from memory: API keys with their roles and
departments, aliases and rollouts. A daemon thread reloads each one from the
database on its own interval. A reload that fails keeps the previous copy,
logs once per outage, counts a refresh failure and lets the copy's age grow
(both exported as metrics); the next successful reload replaces it. So a
database restart costs clinical traffic nothing, and what an administrator
changes (a revoked key, a promoted version) reaches every replica within
one refresh interval once the database answers.

A copy that was never loaded (the database was down when the replica
started) cannot answer: the request gets 503 database_unavailable with
Retry-After, and the thread keeps trying.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from medserve import metrics
from medserve.db.engine import database_error_name
from medserve.errors import DatabaseUnavailableError

logger = logging.getLogger("medserve.gateway.state")

T = TypeVar("T")


class KnownState(Generic[T]):
    """One database-backed value, served from memory and reloaded every ``refresh_s``.

    ``refresh_s`` of 0 reads the database on every use (tests that change the
    registry and expect the next request to see it); there is no copy to fall
    back on then beyond the last one read.
    """

    def __init__(self, name: str, load: Callable[[], T], refresh_s: float) -> None:
        self.name = name
        self._load = load
        self.refresh_s = refresh_s
        self.value: T | None = None
        self.loaded_at: float | None = None  # monotonic time of the last successful load
        self._created_at = time.monotonic()
        self.failures = 0  # reloads that failed since start
        self._failing = False
        self._lock = threading.Lock()  # one load at a time (thread and on-demand loads)

    @property
    def age_s(self) -> float | None:
        """Seconds since the copy was last loaded; None when it never was."""
        return None if self.loaded_at is None else time.monotonic() - self.loaded_at

    @property
    def staleness_s(self) -> float:
        """Seconds the replica has gone without a fresh copy (since start when none was ever loaded)."""
        return time.monotonic() - (self._created_at if self.loaded_at is None else self.loaded_at)

    def due(self, now: float) -> bool:
        return self.loaded_at is None or now - self.loaded_at >= self.refresh_s

    def refresh(self) -> bool:
        """Load now (blocking); on failure keep the old copy. True when the copy is fresh."""
        with self._lock:
            try:
                value = self._load()
            except Exception as error:  # noqa: BLE001 - any database failure keeps the last good copy
                self.failures += 1
                metrics.record_state_refresh_failure(self.name)
                if not self._failing:
                    self._failing = True
                    # Once per outage, and without the message (it can carry connection details).
                    logger.warning("could not refresh %s from the database (%s); serving the copy from %s",
                                   self.name, database_error_name(error),
                                   "never (none loaded yet)" if self.loaded_at is None else
                                   f"{self.age_s:.0f} s ago")
                return False
            self.value, self.loaded_at = value, time.monotonic()
            if self._failing:
                self._failing = False
                logger.warning("%s refreshed from the database again", self.name)
            return True

    async def get(self) -> T:
        """The copy to answer from: never waits on the database once something is loaded."""
        if self.value is None or self.refresh_s <= 0:
            await asyncio.to_thread(self.refresh)
            if self.value is None:
                raise DatabaseUnavailableError(state=self.name)
        return self.value



class StateRefresher:
    """The daemon thread that reloads every registered KnownState when it is due."""

    def __init__(self, states: list[KnownState]) -> None:  # type: ignore[type-arg]
        self.states = [state for state in states if state.refresh_s > 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medserve-state-refresher", daemon=True)

    def start(self) -> StateRefresher:
        if self.states:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _tick_s(self) -> float:
        return max(0.05, min(state.refresh_s for state in self.states) / 2)

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s()):
            now = time.monotonic()
            for state in self.states:
                if state.due(now):
                    state.refresh()

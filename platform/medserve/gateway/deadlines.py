"""Deadlines of engine calls, watched by one timer per event loop instead of one timer per call.

``asyncio.timeout`` pushes a timer on the event loop's heap for every call
and cancels it after: about 3.5 µs per call, and in a py-spy profile of the
gateway's hot imaging route (``benchmarks/gateway_request_path.py``) the
largest single cost medserve added to a request. Here a call registers its
task and deadline in a set; one sweep per ``TICK_S`` cancels the tasks whose
deadline passed, and the caller turns that cancellation into its timeout
error exactly as ``asyncio.timeout`` does (``Task.uncancel``, so a
cancellation from elsewhere is never mistaken for a timeout). Deadlines are
kept to within ``TICK_S``; request timeouts are seconds long.
"""

from __future__ import annotations

import asyncio
import weakref

TICK_S = 0.05


class Watch:
    """One call under a deadline; ``expired`` once the sweep cancelled it."""

    __slots__ = ("task", "deadline", "cancelling", "expired")

    def __init__(self, task: asyncio.Task, deadline: float) -> None:  # type: ignore[type-arg]
        self.task = task
        self.deadline = deadline
        self.cancelling = task.cancelling()
        self.expired = False

    def timed_out(self) -> bool:
        """After the call raised CancelledError: True when it was this deadline's doing alone."""
        return self.expired and self.task.uncancel() <= self.cancelling


class Deadlines:
    """The watched calls of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watches: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, timeout_s: float) -> Watch:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("a deadline needs a running task")
        watch = Watch(task, self._loop.time() + timeout_s)
        self._watches.add(watch)
        if self._timer is None:
            self._timer = self._loop.call_later(min(TICK_S, max(timeout_s, 0.0)), self._sweep)
        return watch

    def release(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def _sweep(self) -> None:
        self._timer = None
        now = self._loop.time()
        for watch in [watch for watch in self._watches if watch.deadline <= now]:
            self._watches.discard(watch)
            watch.expired = True
            watch.task.cancel()
        if self._watches:
            self._timer = self._loop.call_later(TICK_S, self._sweep)


_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines]" = weakref.WeakKeyDictionary()


def deadlines() -> Deadlines:
    """The running event loop's deadlines."""
    loop = asyncio.get_running_loop()
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = Deadlines(loop)
    return found

"""Calls to a model's replicas that arrive together travel together: one handle call per event-loop tick.

A DeploymentHandle call costs the gateway and the replica far more than a
light model's own work: `medserve bench` measured about 2,000 µs of CPU per
request on the no-op model reached by handle against about 550 µs with the
engine in the gateway, nearly all of it Ray's routing, serialisation and
RPC, paid once per call. Under load many requests reach the same model in
the same tick of the gateway's event loop; they are sent as one call
(``ModelServer.call_many``), and each caller gets its own answer back.

Nothing waits to fill a batch: the calls gathered during one pass of the
event loop leave at the start of the next, so a lone request goes out at
once. Every caller keeps its own timeout and error mapping (the gateway
awaits its own future); an error payload answers only its own request; a
batch that fails as a whole (its replica died, Serve's queue is full) fails
each of its callers with that error. The priority gate still admits each
request on its own before it gets here, so a model's capacity limits hold.

Only models of a fixed size are batched (``CatalogEntry.autoscaled``): Ray
Serve's autoscaler counts a replica's ongoing calls, so a batch of many
requests would count as one and hide the load it should scale on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

MAX_BATCH = 64


class HandleBatcher:
    """Batches one method of one model's handle; ``call`` returns a future of that call's own answer."""

    def __init__(self, handle: Callable[[], Any], method: str, max_batch: int = MAX_BATCH) -> None:
        self._handle = handle  # resolved lazily: the handle object is created on first use
        self._method = method
        self._max_batch = max_batch
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        waiting, self._waiting = self._waiting, []
        # A caller that gave up (timeout, client gone) before its batch left is not sent.
        waiting = [(args, future) for args, future in waiting if not future.done()]
        for start in range(0, len(waiting), self._max_batch):
            batch = waiting[start:start + self._max_batch]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._in_flight.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        handle = self._handle()
        try:
            if len(batch) == 1:
                results = [await getattr(handle, self._method).remote(*batch[0][0])]
            else:
                results = await handle.call_many.remote(self._method, [args for args, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - each caller maps it (model unavailable, overloaded)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

"""Server-sent events, and a streaming response whose end the gateway controls.

Starlette's StreamingResponse abandons its body iterator when the client goes
away and leaves closing it to the garbage collector; an audited stream needs
its end to run at a known moment (to write the one audit record and cancel
the engine). ``EventStreamResponse`` therefore watches for the disconnect
itself and always closes the event generator before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from medserve.gateway.responses import dumps

DONE = b"data: [DONE]\n\n"


def sse_event(data: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object, as OpenAI streams do."""
    return b"data: " + dumps(data) + b"\n\n"


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(self._disconnected(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Client gone (or this task cancelled): stop the pump; a CancelledError
            # raised inside the generator marks the audit record cancelled.
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(pump)
            if pump.done():
                # A generator left suspended at a yield is closed here, not by the GC.
                await asyncio.shield(self.events.aclose())
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            exception = pump.exception()
            if not isinstance(exception, OSError):
                raise exception

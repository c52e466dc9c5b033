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
        """Frames go out as they come; while one write is under way (a client slower than the engine),
        the frames that arrive meanwhile wait and leave together as one body message.

        The first frame is written at once, so coalescing never delays the first token; a fast client
        gets every frame in a message of its own, as before. Only this task iterates the event
        generator, so closing it stays safe.
        """
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        waiting: list[bytes] = []
        writer: asyncio.Future[None] | None = None

        async def write_waiting() -> None:
            while waiting:
                body = b"".join(waiting)
                waiting.clear()
                await send({"type": "http.response.body", "body": body, "more_body": True})

        try:
            async for chunk in self.events:
                waiting.append(chunk)
                if writer is None or writer.done():
                    if writer is not None:
                        writer.result()  # a failed write (the client went away) ends the stream here
                    writer = asyncio.ensure_future(write_waiting())
            if writer is not None:
                await writer
            await write_waiting()
        finally:
            if writer is not None and not writer.done():
                writer.cancel()
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

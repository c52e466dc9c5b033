"""Answers sent before the request body has all arrived, made readable to ordinary clients.

urllib, requests and httpx write a whole request body before they read any
answer. When the gateway answers early (413 for a body over the limit, 401
for a bad key on a large upload) and the server then closes the connection
with body bytes still unread, the kernel resets the connection and those
clients report "connection reset" instead of the answer.

So an early answer is sent whole, marked ``Connection: close``, and only then
is the rest of the body read and thrown away, up to a bound, before the
response is finished and the connection closed. A client that sent
``Expect: 100-continue`` and has not started its body (curl does this for
large bodies) is not waited for: it has the answer and sends nothing more.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Methods whose requests carry bodies the gateway reads; GET and friends pass untouched.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# How much of an unread body is drained at most, as a multiple of the body limit;
# beyond it (or after DRAIN_SECONDS) the connection is simply closed.
DRAIN_FACTOR = 4
DRAIN_SECONDS = 30.0


class BodyDrainGuard:
    """Wraps one request's ASGI receive and send; see the module docstring."""

    # Built for every POST on the hot path: only attribute stores here; the
    # headers are read only when an early answer has to be finished.
    __slots__ = ("_scope", "_receive", "_send", "_body_done", "_body_started", "_drain_limit")

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any, max_body_bytes: int,
                 *, body_started: bool = False) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._body_done = False
        # True when part of the body was read before this guard wrapped the channel.
        self._body_started = body_started
        self._drain_limit = DRAIN_FACTOR * max_body_bytes

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            self._body_started = True
            if not message.get("more_body", False):
                self._body_done = True
        elif kind == "http.disconnect":
            self._body_done = True
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if self._body_done:
            await self._send(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        elif kind == "http.response.body" and not message.get("more_body", False):
            # The whole answer goes out now; the response ends after the drain.
            await self._send({**message, "more_body": True})
            if self._body_started or not self._expects_continue():
                await self._drain()
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._send(message)

    def _expects_continue(self) -> bool:
        return any(name == b"expect" and value.lower() == b"100-continue" for name, value in self._scope["headers"])

    async def _drain(self) -> None:
        drained = 0
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while not self._body_done and drained <= self._drain_limit:
                    message = await self.receive()
                    drained += len(message.get("body", b""))
        except TimeoutError:
            pass

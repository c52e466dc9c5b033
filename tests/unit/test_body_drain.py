"""An answer sent before the request body has all arrived: sent whole, then the rest of the body is read."""

from __future__ import annotations

import asyncio
from typing import Any

from medserve.gateway.body_drain import DRAIN_FACTOR, BodyDrainGuard


class Wire:
    """The server side of one connection: body chunks the client sends, and what the app sent back."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                        for i, c in enumerate(chunks)]
        self.sent: list[tuple[str, Any]] = []  # ("send", message) or ("read", n bytes) in the order they happened

    async def receive(self) -> dict[str, Any]:
        if not self.pending:
            await asyncio.sleep(3600)  # a client that sends nothing more
        message = self.pending.pop(0)
        self.sent.append(("read", len(message["body"])))
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(("send", message))


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "headers": list(headers)}


async def early_answer(guard: BodyDrainGuard, body_read: int = 1) -> None:
    for _ in range(body_read):
        await guard.receive()
    await guard.send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await guard.send({"type": "http.response.body", "body": b'{"error":{"code":"payload_too_large"}}'})


def test_an_early_answer_goes_out_whole_then_the_rest_of_the_body_is_read_then_the_response_ends():
    wire = Wire([b"x" * 10] * 5)
    asyncio.run(early_answer(BodyDrainGuard(scope(), wire.receive, wire.send, max_body_bytes=1024)))
    kinds = [(kind, m if kind == "read" else m["type"]) for kind, m in wire.sent]
    assert kinds == [("read", 10), ("send", "http.response.start"), ("send", "http.response.body"),
                     ("read", 10), ("read", 10), ("read", 10), ("read", 10), ("send", "http.response.body")]
    start, answer, end = (m for kind, m in wire.sent if kind == "send")
    assert (b"connection", b"close") in start["headers"]
    assert answer["more_body"] is True and b"payload_too_large" in answer["body"]
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}


def test_an_answer_after_the_whole_body_is_untouched():
    wire = Wire([b"x" * 10])
    asyncio.run(early_answer(BodyDrainGuard(scope(), wire.receive, wire.send, max_body_bytes=1024)))
    start, answer = (m for kind, m in wire.sent if kind == "send")
    assert (b"connection", b"close") not in start["headers"] and "more_body" not in answer


def test_a_client_waiting_for_100_continue_is_answered_without_waiting_for_its_body():
    wire = Wire([b"x" * 10])
    guard = BodyDrainGuard(scope((b"expect", b"100-continue")), wire.receive, wire.send, max_body_bytes=1024)
    asyncio.run(asyncio.wait_for(early_answer(guard, body_read=0), timeout=5))
    assert [kind for kind, _ in wire.sent] == ["send", "send", "send"]


def test_the_drain_stops_at_its_bound():
    limit = 100
    wire = Wire([b"x" * 50] * (DRAIN_FACTOR * limit // 50 + 10))
    asyncio.run(early_answer(BodyDrainGuard(scope(), wire.receive, wire.send, max_body_bytes=limit)))
    drained = sum(n for kind, n in wire.sent[3:] if kind == "read")
    assert DRAIN_FACTOR * limit <= drained <= DRAIN_FACTOR * limit + 50 and wire.pending
    assert wire.sent[-1] == ("send", {"type": "http.response.body", "body": b"", "more_body": False})

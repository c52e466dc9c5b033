"""A streamed answer to a client slower than the engine: frames that piled up leave together; the first at once."""

from __future__ import annotations

import asyncio

from medserve.gateway.sse import EventStreamResponse


def _stream_to(slow_send_s: float, frames: int) -> list[bytes]:
    bodies: list[bytes] = []

    async def events():  # type: ignore[no-untyped-def]
        for index in range(frames):
            yield f"data: {index}\n\n".encode()
            await asyncio.sleep(0.001)  # the engine: a frame every millisecond

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            await asyncio.sleep(slow_send_s)  # the client reads slowly

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    asyncio.run(EventStreamResponse(events())({"type": "http"}, receive, send))
    return bodies


def test_a_slow_client_gets_the_frames_that_waited_in_one_message_and_the_first_alone():
    bodies = _stream_to(slow_send_s=0.02, frames=40)
    assert bodies[0] == b"data: 0\n\n"  # never held back to wait for company
    assert bodies[-1] == b""  # the end of the body
    assert b"".join(bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(40))  # all, in order
    assert len(bodies) < 20  # coalesced: far fewer messages than frames


def test_a_fast_client_gets_one_message_per_frame():
    bodies = _stream_to(slow_send_s=0.0, frames=10)
    assert bodies[:-1] == [f"data: {i}\n\n".encode() for i in range(10)]

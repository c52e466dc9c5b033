"""Backpressure at the gateway: a full model queue is refused at once (503 + Retry-After), not left to time out."""

from __future__ import annotations

import asyncio
import json

import pytest

from medserve.errors import ModelOverloadedError
from medserve.gateway.errors import error_response
from medserve.gateway.quotas import PriorityGate


def test_beyond_max_waiting_the_next_request_is_refused_at_once_and_waiters_keep_their_priority_order():
    async def scenario() -> list[str]:
        gate = PriorityGate(2, max_waiting=2, model="m")
        order: list[str] = []
        releases = {name: asyncio.Event() for name in ("a", "b", "research", "icu", "late")}

        async def request(name: str, klass: str) -> None:
            async with gate.slot(klass):
                order.append(name)
                await releases[name].wait()

        holders = [asyncio.create_task(request("a", "standard")), asyncio.create_task(request("b", "standard"))]
        await asyncio.sleep(0)
        assert gate.in_flight == 2 and gate.waiting == 0
        # The research waiter arrives first, the emergency one second.
        waiters = [asyncio.create_task(request("research", "research"))]
        await asyncio.sleep(0)
        waiters.append(asyncio.create_task(request("icu", "emergency")))
        await asyncio.sleep(0.01)
        assert gate.in_flight == 2 and gate.waiting == 2

        # Capacity in flight and max_waiting waiting: refused without waiting, whatever its class.
        for klass in ("emergency", "standard", "research"):
            entering = gate.slot(klass).__aenter__()
            with pytest.raises(ModelOverloadedError) as refused:
                entering.send(None)  # its first step, before any await: it never queued
            assert refused.value.code == "model_overloaded" and refused.value.http_status == 503
            assert refused.value.details == {"model": "m", "retry_after_s": 1}
        # The refusals took nothing: the slots and the queue are as they were.
        assert gate.in_flight == 2 and gate.waiting == 2

        # One slot frees: the emergency waiter goes first although it came second.
        releases["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "icu"]
        assert gate.in_flight == 2 and gate.waiting == 1
        # With room in the queue again, a new request waits instead of being refused.
        waiters.append(asyncio.create_task(request("late", "standard")))
        await asyncio.sleep(0.01)
        assert gate.waiting == 2

        releases["b"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "icu", "late"]  # standard before research
        releases["icu"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "icu", "late", "research"]
        for event in releases.values():
            event.set()
        await asyncio.gather(*holders, *waiters)
        assert gate.in_flight == 0 and gate.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "icu", "late", "research"]


def test_max_waiting_zero_refuses_whenever_every_slot_is_taken():
    async def scenario() -> int:
        gate = PriorityGate(1, max_waiting=0, model="m")
        hold = asyncio.Event()

        async def holder() -> None:
            async with gate.slot("standard"):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(ModelOverloadedError):
            async with gate.slot("emergency"):
                pass
        hold.set()
        await task
        async with gate.slot("standard"):  # free again: admitted
            assert gate.in_flight == 1
        return gate.in_flight

    assert asyncio.run(scenario()) == 0


def test_unbounded_gate_never_refuses():
    async def scenario() -> int:
        gate = PriorityGate(1, model="m")
        hold = asyncio.Event()

        async def request() -> None:
            async with gate.slot("standard"):
                await hold.wait()

        tasks = [asyncio.create_task(request()) for _ in range(50)]
        await asyncio.sleep(0.01)
        assert gate.in_flight == 1 and gate.waiting == 49
        hold.set()
        await asyncio.gather(*tasks)
        return gate.in_flight

    assert asyncio.run(scenario()) == 0


def test_model_overloaded_is_a_503_with_retry_after():
    response = error_response(ModelOverloadedError(model="m", retry_after_s=1))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    body = json.loads(response.body)
    assert body["error"]["code"] == "model_overloaded"
    assert body["error"]["details"] == {"model": "m", "retry_after_s": 1}


def test_retry_after_is_a_whole_positive_number_of_seconds():
    assert error_response(ModelOverloadedError(model="m", retry_after_s=2.5)).headers["Retry-After"] == "3"
    assert error_response(ModelOverloadedError(model="m", retry_after_s=0)).headers["Retry-After"] == "1"
    # Without a retry_after_s, every 503 still says when to come back.
    assert error_response(ModelOverloadedError(model="m")).headers["Retry-After"] == "1"

"""Engines placed in the gateway, the fast dispatch of hot routes, and the bench's load generator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medserve.bench.loadgen import Request, run_load
from medserve.bench.runner import noop_spec
from medserve.controlplane.render import COMPLIANCE_APP, GATEWAY_APP, RenderOptions, catalog_entry, render_serve_config
from medserve.db.engine import session_scope
from medserve.errors import SpecError
from medserve.gateway.app import create_app
from medserve.gateway.deadlines import deadlines
from medserve.gateway.state import GatewayState, set_gateway
from medserve.security.api_keys import create_api_key
from medserve.specs import parse_spec


@contextlib.contextmanager
def noop_gateway(tmp_path: Path, database_url: str, *entries: dict[str, Any],
                 **settings: Any) -> Iterator[tuple[TestClient, str, GatewayState]]:
    state = GatewayState(list(entries), {"home": tmp_path, "database_url": database_url,
                                         "pseudonym_key": "test-pseudonym-key", **settings})
    set_gateway(state)
    with session_scope(database_url) as session:
        _, key = create_api_key(session, name="hot path", role="clinical-app")
    try:
        with TestClient(create_app()) as client:
            yield client, key, state
    finally:
        set_gateway(None)
        state.close()


def in_gateway_entry(name: str = "noop-here", **changes: Any) -> dict[str, Any]:
    entry = catalog_entry(noop_spec(name, "gateway")).model_dump(mode="json")
    entry.update(changes)
    return entry


def test_an_engine_placed_in_the_gateway_answers_in_process_and_is_audited(tmp_path, database_url):
    with noop_gateway(tmp_path, database_url, in_gateway_entry()) as (client, key, state):
        assert set(state.local_engines) == {"model-noop-here-v1"}
        response = client.post("/v1/imaging/noop-here", content=b"ignored",
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["top_label"] == "noop" and body["model_version"] == "1" and body["status"] == "draft"
        assert response.headers["X-Medserve-Inference-Id"] == body["inference_id"]
        # The provenance headers the hot route writes as raw pairs: the same names and values as everywhere.
        assert (response.headers["X-Medserve-Model"], response.headers["X-Medserve-Model-Version"],
                response.headers["X-Medserve-Audit"]) == ("noop-here", "1", "committed")
        assert state.writer.flush()
    from medserve.db.models import AuditRecord

    with session_scope(database_url) as session:
        rows = session.query(AuditRecord).all()
    assert [(row.model_name, row.outcome, row.http_status) for row in rows] == [("noop-here", "ok", 200)]
    assert rows[0].output_sha256 and rows[0].input_sha256


def test_an_engine_that_fails_to_load_in_the_gateway_is_503_not_a_dead_gateway(tmp_path, database_url):
    broken = in_gateway_entry("noop-broken")
    broken["engine_spec"]["model"]["artifact"]["sha256"] = "0" * 64  # parameters no longer match the pin
    with noop_gateway(tmp_path, database_url, broken, in_gateway_entry()) as (client, key, state):
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
        assert set(state.local_engines) == {"model-noop-here-v1"}
        refused = client.post("/v1/imaging/noop-broken", content=b"x", headers=headers)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        assert refused.headers["Retry-After"] == "1"
        assert client.post("/v1/imaging/noop-here", content=b"x", headers=headers).status_code == 200


def test_the_fast_path_answers_exactly_as_the_fastapi_route(tmp_path, database_url):
    with noop_gateway(tmp_path, database_url, in_gateway_entry()) as (client, key, _state):
        cases = [
            ({"Authorization": f"Bearer {key}", "Content-Type": "image/png"}, "/v1/imaging/noop-here"),
            ({"Content-Type": "image/png"}, "/v1/imaging/noop-here"),  # no key: 401
            ({"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}, "/v1/imaging/noop-here"),  # 415
            ({"Authorization": f"Bearer {key}", "Content-Type": "image/png"}, "/v1/imaging/unknown-model"),  # 404
        ]
        fast = [client.post(path, content=b"x", headers=headers) for headers, path in cases]
        client.app.fast_routes = ()  # the same requests through FastAPI's router
        routed = [client.post(path, content=b"x", headers=headers) for headers, path in cases]
    assert [r.status_code for r in fast] == [200, 401, 415, 404]
    assert [r.status_code for r in routed] == [r.status_code for r in fast]
    for a, b in zip(fast, routed):
        body_a, body_b = a.json(), b.json()
        for volatile in ("inference_id",):
            body_a.pop(volatile, None), body_b.pop(volatile, None)
        assert body_a == body_b
        assert a.headers.get("Retry-After") == b.headers.get("Retry-After")
        assert a.headers.get("WWW-Authenticate") == b.headers.get("WWW-Authenticate")


def test_an_engine_past_the_request_timeout_is_504_and_audited(tmp_path, database_url):
    slow = catalog_entry(noop_spec("noop-slow", "gateway", delay_ms=5000)).model_dump(mode="json")
    with noop_gateway(tmp_path, database_url, slow, request_timeout_s=0.2) as (client, key, state):
        # The engine would answer 200 after 5 s: a 504 is the deadline's doing.
        response = client.post("/v1/imaging/noop-slow", content=b"x",
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert response.status_code == 504 and response.json()["error"]["code"] == "model_timeout"
        assert state.writer.flush()
    from medserve.db.models import AuditRecord

    with session_scope(database_url) as session:
        rows = session.query(AuditRecord).all()
    assert [(row.http_status, row.error_code) for row in rows] == [(504, "model_timeout")]


def test_a_deadline_never_mistakes_another_cancellation_for_a_timeout():
    async def scenario() -> tuple[bool, bool]:
        watched = deadlines()

        async def call(timeout_s: float) -> bool:
            watch = watched.watch(timeout_s)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return watch.timed_out()
            finally:
                watched.release(watch)
            return False

        timed_out = await asyncio.create_task(call(0.05))
        cancelled_from_outside = asyncio.create_task(call(60))
        await asyncio.sleep(0.01)
        cancelled_from_outside.cancel()
        return timed_out, await cancelled_from_outside

    assert asyncio.run(scenario()) == (True, False)


def test_paths_the_fast_path_does_not_own_fall_through_to_fastapi(tmp_path, database_url):
    with noop_gateway(tmp_path, database_url, in_gateway_entry()) as (client, key, _state):
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
        assert client.post("/v1/imaging/a/b", content=b"x", headers=headers).status_code == 404
        assert client.get("/v1/imaging/noop-here", headers=headers).status_code == 405
        assert client.get("/healthz").json() == {"status": "ok"}


def test_gateway_placement_renders_no_application_and_gives_the_gateway_its_resources():
    here = noop_spec("noop-here", "gateway", num_cpus=0.5)
    apart = noop_spec("noop-apart", "replicas")
    config = render_serve_config([here, apart], RenderOptions())
    names = [app["name"] for app in config["applications"]]
    assert names == [GATEWAY_APP, "model-noop-apart-v1", COMPLIANCE_APP]
    gateway = config["applications"][0]
    assert gateway["deployments"][0]["ray_actor_options"]["num_cpus"] == pytest.approx(0.25 + 0.5)
    assert gateway["deployments"][0]["max_ongoing_requests"] == RenderOptions().gateway_max_ongoing_requests
    entries = {entry["model_name"]: entry for entry in gateway["args"]["catalog"]}
    assert entries["noop-here"]["placement"] == "gateway"
    assert entries["noop-here"]["engine_spec"]["model"]["engine"] == "noop"
    assert entries["noop-apart"]["engine_spec"] is None


@pytest.mark.parametrize(("change", "problem"), [
    ({"alias": "production"}, "set alias: null"),
    ({"resources": {"num_cpus": 1, "num_gpus": 0.5}}, "GPUs"),
    ({"resources": {"custom": {"radiology_gpu": 1}}}, "custom resources"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 3}}, "replica counts"),
])
def test_gateway_placement_refuses_what_the_gateway_cannot_carry(change, problem):
    document = noop_spec("noop-here", "gateway").model_dump(mode="json")
    document.update(change)
    with pytest.raises(SpecError, match=problem):
        parse_spec(document)


def test_load_generator_counts_answers_statuses_and_latencies():
    async def scenario() -> Any:
        served = 0

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    await reader.readexactly(length)
                    served += 1
                    status = b"200 OK" if served % 4 else b"503 Service Unavailable"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_load(f"http://127.0.0.1:{port}", Request("POST", "/x", b"abc"),
                                  concurrency=4, duration_s=0.5, warmup_s=0.1, label="local")

    result = asyncio.run(scenario())
    assert result.requests > 20 and len(result.latencies_s) == result.requests
    assert set(result.statuses) == {200, 503} and result.errors == result.statuses[503]
    assert 0 < result.percentile_ms(50) <= result.percentile_ms(99)
    assert result.summary()["throughput_rps"] == pytest.approx(result.requests / 0.5, rel=0.01)


def test_an_engine_that_would_make_the_gateway_unplaceable_is_skipped_with_the_reason():
    from medserve.controlplane.reconcile import plan

    small = noop_spec("noop-small", "gateway", num_cpus=0.5)
    large = noop_spec("noop-large", "gateway", num_cpus=1.5)
    items = plan([small, large], [{"CPU": 2.0}], gateway_num_cpus=0.25)
    assert [item.deploy for item in items] == [True, False]
    assert "gateway's replica would need 2.25 CPUs, the largest node has 2" in (items[1].reason or "")

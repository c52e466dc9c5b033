"""The gateway's own port (gateway/listener.py): served in the running loop, shared, drained on stop."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from medserve.bench.private import free_port
from medserve.controlplane.render import RenderOptions, render_gateway_app
from medserve.errors import GatewayListenerError
from medserve.gateway.listener import GatewayListener, ListenerConfig
from medserve.settings import Settings


def _app(name: str, release: asyncio.Event | None = None):
    """An ASGI app that names itself; with ``release``, /slow answers only once the event is set."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        assert scope["type"] == "http"
        if scope["path"] == "/slow" and release is not None:
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": name.encode()})

    return app


async def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on {port}")


def test_a_listener_serves_its_app_in_the_running_loop_and_closes_its_port_on_stop():
    port = free_port()

    async def scenario() -> tuple[int, str, bool]:
        listener = GatewayListener(_app("gateway"), ListenerConfig(host="127.0.0.1", port=port))
        listener.start()
        await _wait_listening(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answer = await client.get("/anything")
        assert listener.failed is None
        await listener.stop()
        try:
            await asyncio.open_connection("127.0.0.1", port)
            refused = False
        except OSError:
            refused = True
        return answer.status_code, answer.text, refused

    status, text, refused = asyncio.run(scenario())
    assert (status, text) == (200, "gateway")
    assert refused, "the port still accepted connections after stop()"


def test_stop_finishes_the_requests_in_flight_before_returning():
    """Serve does not see these requests, so the replica's __del__ (listener.stop) must drain them itself."""
    port = free_port()

    async def scenario() -> tuple[int, str]:
        release = asyncio.Event()
        listener = GatewayListener(_app("drained", release), ListenerConfig(host="127.0.0.1", port=port))
        listener.start()
        await _wait_listening(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            in_flight = asyncio.create_task(client.get("/slow"))
            await asyncio.sleep(0.2)  # the request is in the app, waiting
            stopping = asyncio.create_task(listener.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done(), "stop() returned with a request in flight"
            release.set()
            answer = await in_flight
            await stopping
        return answer.status_code, answer.text

    assert asyncio.run(scenario()) == (200, "drained")


def test_the_replicas_on_one_node_share_the_port():
    """Two gateway replicas on one node bind the same port (SO_REUSEPORT); a replacement can bind before
    the old replica lets go. Each connection is answered by one of them."""
    port = free_port()

    async def scenario() -> set[str]:
        first = GatewayListener(_app("first"), ListenerConfig(host="127.0.0.1", port=port))
        second = GatewayListener(_app("second"), ListenerConfig(host="127.0.0.1", port=port))
        first.start()
        second.start()
        await _wait_listening(port)
        answered: set[str] = set()
        for _ in range(40):  # a new connection each time: the kernel picks a listener per connection
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                answered.add((await client.get("/")).text)
        await first.stop()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            after = (await client.get("/")).text
        await second.stop()
        assert after == "second", "the remaining replica answers once the other stopped"
        return answered

    assert asyncio.run(scenario()) == {"first", "second"}


def test_a_port_taken_by_another_program_fails_the_replica_start_with_the_reason():
    with socket.socket() as taken:  # no SO_REUSEPORT: not one of the gateway's replicas
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayListenerError) as raised:
            GatewayListener(_app("gateway"), ListenerConfig(host="127.0.0.1", port=port))
    assert raised.value.code == "gateway_listener_unavailable"
    assert raised.value.details["port"] == port
    assert "Address already in use" in raised.value.details["reason"]


def test_an_unreadable_certificate_fails_the_replica_start_with_the_reason_and_frees_the_port(tmp_path):
    from tests.unit.test_transport_and_inputs import self_signed

    _, key = self_signed(tmp_path)
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    port = free_port()
    for certfile in (str(tmp_path / "missing.pem"), str(garbled)):
        with pytest.raises(GatewayListenerError) as raised:
            GatewayListener(_app("tls"), ListenerConfig(host="127.0.0.1", port=port, ssl_certfile=certfile,
                                                        ssl_keyfile=key))
        assert raised.value.details["certfile"] == certfile
    # The port was let go (the error's traceback still holds the failed listener): a socket without
    # SO_REUSEPORT, which could not share it with a socket still bound there, binds it.
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", port))


def test_the_control_plane_renders_the_listener_into_the_gateway_application():
    options = RenderOptions(http_host="0.0.0.0", gateway_listen_port=8100,
                            ssl_certfile="/tls/cert.pem", ssl_keyfile="/tls/key.pem")
    assert render_gateway_app([], options)["args"]["listener"] == {
        "host": "0.0.0.0", "port": 8100, "ssl_certfile": "/tls/cert.pem", "ssl_keyfile": "/tls/key.pem"}
    # Off: the gateway answers through Serve's ports only.
    assert "listener" not in render_gateway_app([], RenderOptions())["args"]
    assert "listener" not in render_gateway_app([], RenderOptions.from_settings(
        Settings(gateway_listen_port=0)))["args"]


def test_clinical_apps_are_pointed_at_the_gateways_own_port_when_it_is_on():
    on = Settings(gateway_host="127.0.0.1", gateway_port=8000, gateway_listen_port=8100)
    assert (on.gateway_url, on.serve_proxy_url) == ("http://127.0.0.1:8100", "http://127.0.0.1:8000")
    off = Settings(gateway_host="127.0.0.1", gateway_port=8000, gateway_listen_port=0)
    assert off.gateway_url == "http://127.0.0.1:8000"
    assert RenderOptions.from_settings(on).gateway_listen_port == 8100


def test_the_gateways_own_port_speaks_https_with_the_gateways_tls_files(tmp_path):
    from tests.unit.test_transport_and_inputs import self_signed

    cert, key = self_signed(tmp_path)
    port = free_port()

    async def scenario() -> tuple[int, str]:
        listener = GatewayListener(_app("tls"), ListenerConfig(host="127.0.0.1", port=port,
                                                               ssl_certfile=cert, ssl_keyfile=key))
        listener.start()
        await _wait_listening(port)
        try:
            async with httpx.AsyncClient(base_url=f"https://localhost:{port}", verify=cert) as client:
                answer = await client.get("/")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as plain:
                with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS port
                    await plain.get("/")
        finally:
            await listener.stop()
        return answer.status_code, answer.text

    assert asyncio.run(scenario()) == (200, "tls")


def test_a_server_that_ended_without_being_stopped_is_reported_for_the_health_check():
    """Gateway.check_health raises on ``failed``, and Ray Serve replaces the replica."""
    port = free_port()

    async def scenario() -> tuple[object, object]:
        listener = GatewayListener(_app("gateway"), ListenerConfig(host="127.0.0.1", port=port))
        listener.start()
        await _wait_listening(port)
        serving = listener.failed
        listener._task.cancel()  # the server's task ends though nobody called stop()
        await asyncio.sleep(0.05)
        ended = listener.failed
        await listener.stop()
        return serving, ended

    serving, ended = asyncio.run(scenario())
    assert serving is None
    assert isinstance(ended, asyncio.CancelledError)

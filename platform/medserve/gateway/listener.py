"""The gateway's own port: each gateway replica answers HTTP itself, without Ray Serve's per-request layer.

Why. Ray Serve's direct ingress is its fastest HTTP path, and raw Ray Serve's
no-op answer spends most of its replica's CPU in it: per request Serve
copies and scans the headers, builds a request id and its metadata, checks
backpressure, wraps the ASGI receive in a task, sets a request context,
records its own request metrics and hands the call to the user callable.
The gateway, which must also authenticate, audit and meter, could not do its
own work inside what was left (docs/speed.md: 0.59-0.69 of raw Ray Serve in
every measured variant of the audit path and the request path). Served from
this listener, the same gateway app (the same door: authentication, audit
record, metering) answers without that layer; the replica is still a Ray Serve
replica, deployed, placed, health-checked, upgraded and stopped by Serve.

What the gateway gives up on this port, and why that is acceptable:

- Serve's ``max_ongoing_requests`` for the gateway deployment: Serve never
  sees these requests. The gateway mostly waits (engines, audit commits), each
  model's own limits are enforced at its gate (``max_queued_requests``, 503
  ``model_overloaded``), and the gateway has a fixed replica count (Serve
  never autoscaled it on load).
- Serve's per-request metrics and request-id header for the gateway:
  medserve's own metrics (``medserve_gateway_*``, monitoring/) and the audit
  record's inference id are what the dashboards, alerts and clinical apps read.
- Serve's graceful drain of the gateway's requests: the replica's ``__del__``
  (which Serve awaits before stopping it) closes this port and waits for the
  requests in flight, as Serve would (``GRACEFUL_SHUTDOWN_S``).

Every gateway replica on a node binds the same port with ``SO_REUSEPORT``:
the kernel spreads connections over them, and a replacement replica can bind
before the old one has let go. Serve's proxy port and its direct-ingress
ports keep answering too (the same app, through Serve's layer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medserve.errors import GatewayListenerError

log = logging.getLogger(__name__)

# As Ray Serve's HTTP options default (keep_alive_timeout_s): clients that hold a
# connection open between calls, as clinical apps do, are not cut in between.
KEEP_ALIVE_S = 90
# As Ray Serve's default graceful_shutdown_timeout_s for a replica's requests in flight.
GRACEFUL_SHUTDOWN_S = 20.0


class ListenerConfig(BaseModel):
    """Where and how a gateway replica listens; rendered by the control plane from the settings."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="Address to bind (MEDSERVE_GATEWAY_HOST).")
    port: int = Field(ge=1, le=65535, description="Port to bind (MEDSERVE_GATEWAY_LISTEN_PORT).")
    ssl_certfile: str | None = Field(default=None, description="PEM certificate chain: HTTPS on this port.")
    ssl_keyfile: str | None = Field(default=None, description="PEM private key for ssl_certfile.")


def bind_shared(host: str, port: int) -> socket.socket:
    """A listening TCP socket that the node's other gateway replicas may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class GatewayListener:
    """uvicorn serving one ASGI app on a shared port, inside the running event loop."""

    def __init__(self, app: Any, config: ListenerConfig) -> None:
        import uvicorn

        self.config = config
        try:
            self._socket = bind_shared(config.host, config.port)
        except OSError as error:
            # The port and the reason in the message too: Serve shows an operator the message, not the details.
            raise GatewayListenerError(
                f"the gateway's own port {config.host}:{config.port} is taken by a program that is not a gateway "
                f"replica, or cannot be bound ({error})",
                host=config.host, port=config.port, reason=str(error)) from error
        # uvicorn's own error logger would add a per-message middleware unless it is quiet (as Serve does).
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self._server = uvicorn.Server(uvicorn.Config(
            lambda: app, factory=True, lifespan="off", access_log=False, log_level=None, log_config=None,
            http="httptools", ws="none", timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            # Forwarded headers are not trusted: the audit records the peer that connected.
            proxy_headers=False,
            # No "server: uvicorn" on the hospital's network: the answer names no software it need not.
            server_header=False,
            ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        ))
        # uvicorn installs signal handlers only from the main thread, and the replica owns its signals.
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        # Load now, not in the server's task: an unreadable certificate then fails the replica's
        # constructor with the reason, instead of a replica that is up and serves nothing.
        try:
            self._server.config.load()
        except (OSError, ssl.SSLError) as error:
            self._socket.close()
            raise GatewayListenerError(
                f"the gateway's TLS certificate or key cannot be read ({error})",
                port=config.port, certfile=config.ssl_certfile, keyfile=config.ssl_keyfile,
                reason=str(error)) from error
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start serving on the running loop (a Serve replica's constructor runs on it)."""
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))

    @property
    def failed(self) -> BaseException | None:
        """Why the server stopped when nobody asked it to; None while it serves."""
        task = self._task
        if task is None or not task.done() or self._server.should_exit:
            return None
        return task.exception() if not task.cancelled() else asyncio.CancelledError()

    async def stop(self) -> None:
        """Close the port, finish the requests in flight (at most GRACEFUL_SHUTDOWN_S), then return."""
        self._server.should_exit = True
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), GRACEFUL_SHUTDOWN_S + 5)
            except TimeoutError:  # asyncio's own, since Python 3.11
                log.warning("gateway listener on port %d did not stop in time", self.config.port)
            except Exception:  # the replica's shutdown (the audit drain) goes on regardless
                log.exception("gateway listener on port %d failed while stopping", self.config.port)
        # A server that had already ended (the health check saw it) has nothing left to finish.
        self._socket.close()

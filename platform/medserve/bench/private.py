"""A private medserve on a private local Ray, for benchmarks.

`medserve bench` and `benchmarks/llm_throughput.py` start one exactly as
`medserve up` would (token auth, SQLite under a temporary MEDSERVE_HOME,
free ports), so nothing they measure or deploy touches a running medserve.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from medserve.controlplane.reconcile import ApplyResult, apply_catalog
from medserve.controlplane.render import RenderOptions
from medserve.controlplane.targets import RayClusterTarget
from medserve.specs import DeploymentSpec, PipelineSpec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ExtraAppsTarget:
    """A target that adds applications of the benchmark's own (the raw Ray Serve
    baseline) to every config medserve renders, so both run side by side."""

    def __init__(self, target: RayClusterTarget, extra_apps: list[dict[str, Any]]) -> None:
        self._target = target
        self._extra_apps = extra_apps
        self.description = target.description

    def apply(self, config: dict[str, Any]) -> None:
        self._target.apply({**config, "applications": [*config["applications"], *self._extra_apps]})

    def wait_until_running(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
        return self._target.wait_until_running(names, timeout_s=timeout_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@dataclass
class PrivatePlatform:
    """A running private medserve: where to send requests, and how to change and stop it."""

    settings: Any
    target: RayClusterTarget
    proxy_url: str
    key: str
    # The gateway's own port (gateway/listener.py), as `up` ships it: what clinical apps call.
    gateway_url: str
    stop: Callable[[], None]
    extra_apps: list[dict[str, Any]] = field(default_factory=list)
    gateway_replicas: int = 1

    def apply(self, specs: list[DeploymentSpec | PipelineSpec], **gateway_settings: Any) -> ApplyResult:
        options = RenderOptions.from_settings(self.settings, gateway_replicas=self.gateway_replicas)
        options = options.model_copy(update={"gateway_settings": {**options.gateway_settings, **gateway_settings}})
        target = ExtraAppsTarget(self.target, self.extra_apps) if self.extra_apps else self.target
        return apply_catalog(self.settings.resolved_database_url, specs, target, options,  # type: ignore[arg-type]
                             registered_by="benchmark", require_approved=False)

    def ingress_urls(self) -> dict[str, list[str]]:
        """Application name -> base URLs of its direct-ingress replicas (empty through the proxy)."""
        # Replicas listen where http_options told them to: on this private platform, loopback.
        host = self.settings.gateway_host if self.settings.gateway_host not in ("0.0.0.0", "::") else None
        return self.target.ingress_targets(host)


def start_private_platform(*, throughput_optimized: bool, extra_apps: list[dict[str, Any]] | None = None,
                           ray_num_cpus: int | None = None, gateway_replicas: int = 1) -> PrivatePlatform:
    """Start Ray and prepare the database and an API key; the caller applies the specs.

    ``throughput_optimized`` starts Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    (Serve's direct ingress, gRPC between deployments, no per-request
    access log): Ray Serve's fastest configuration, for both sides.
    """
    home = tempfile.mkdtemp(prefix="medserve-bench-")
    environment = {
        "MEDSERVE_HOME": home,
        "MEDSERVE_GATEWAY_PORT": str(free_port()),
        "MEDSERVE_GATEWAY_LISTEN_PORT": str(free_port()),
        "MEDSERVE_RAY_DASHBOARD_PORT": str(free_port()),
        "MEDSERVE_RAY_HEAD_PORT": str(free_port()),
        # A short temp dir: Ray's unix socket paths are limited to ~107 characters.
        "MEDSERVE_RAY_TEMP_DIR": tempfile.mkdtemp(prefix="msb-", dir="/tmp"),
        "RAY_AUTH_MODE": "token",
        # The benchmark's models are research-use versions nobody has approved.
        "MEDSERVE_REQUIRE_APPROVED_VERSIONS": "false",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if throughput_optimized else "0",
    }
    if ray_num_cpus is not None:
        environment["MEDSERVE_RAY_NUM_CPUS"] = str(ray_num_cpus)
    # `ray start` and the replicas inherit this process's environment.
    os.environ.update(environment)
    from medserve.controlplane.local_ray import start_local_ray, stop_local_ray
    from medserve.db.engine import session_scope, upgrade
    from medserve.security.api_keys import create_api_key
    from medserve.settings import Settings

    settings = Settings()
    upgrade(settings.resolved_database_url)
    settings.pseudonym_key_bytes()  # the keys exist before replicas race to create them, as in `up`
    settings.audit_signing_key_bytes()
    connection = start_local_ray(settings)
    with session_scope(settings.resolved_database_url) as session:
        # No request-rate limit: the benchmark measures the door, not the default quota.
        _, key = create_api_key(session, name="benchmark", role="clinical-app", rate_limit_rps=0)
    return PrivatePlatform(
        settings=settings,
        target=RayClusterTarget(connection.dashboard_url, connection.auth_token),
        proxy_url=f"http://127.0.0.1:{settings.gateway_port}",
        gateway_url=f"http://127.0.0.1:{settings.gateway_listen_port}",
        key=key,
        stop=lambda: stop_local_ray(settings),
        extra_apps=list(extra_apps or []),
        gateway_replicas=gateway_replicas,
    )


def wait_for_answer(url: str, path: str, headers: dict[str, str], content: bytes, timeout_s: float = 60.0) -> None:
    """Until the route answers 200 (a new direct-ingress port can lag the RUNNING status)."""
    import time

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.post(url + path, headers=headers, content=content, timeout=10.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = type(error).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{url}{path} did not answer 200 in {timeout_s:.0f}s ({last})")

"""Where a rendered Serve config goes.

``RayClusterTarget`` speaks the Ray dashboard's Serve REST API (the API
`serve deploy` uses), so one implementation serves both the local Ray that
`medserve up` starts and a remote on-prem Ray cluster. The KubeRay target
(patching a RayService) implements the same protocol.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

import httpx

from medserve.errors import ClusterError

RUNNING = "RUNNING"
# Serve names an application's failure and a deployment's alike.
FAILED_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def application_message(message: str, deployments: dict[str, Any] | None) -> str:
    """An application's status message, with the reason of each of its failed deployments appended.

    Serve's message for a failed application only names the deployments
    ("Failed to update the deployments ['Gateway']."); the reason is the last
    line of each deployment's own message, the exception a replica's
    constructor raised (for example ``GatewayListenerError: the gateway's own
    port ... is taken``), below a traceback an operator need not read first.
    """
    reasons = []
    for name, deployment in sorted((deployments or {}).items()):
        if (deployment or {}).get("status") not in FAILED_STATES:
            continue
        lines = [line.strip() for line in _TERMINAL_COLOURS.sub("", deployment.get("message") or "").splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        if last:
            reasons.append(f"{name}: {last}")
    return " ".join([message, *reasons]).strip()


class ServeTarget(Protocol):
    description: str

    def apply(self, config: dict[str, Any]) -> None:
        """Make the cluster serve exactly this config (declarative: absent apps are removed)."""

    def application_status(self) -> dict[str, dict[str, Any]]:
        """Application name -> {"status": ..., "message": ...}."""

    def delete_all(self) -> None:
        """Remove every Serve application."""

    def node_resources(self) -> list[dict[str, float]]:
        """Total resources of each alive node, to decide which specs can run."""

    def wait_until_running(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
        """After apply: wait until the named applications run and return their statuses
        (ClusterError if one fails), or return {} at once where the target rolls out
        on its own and nothing here should wait."""


class RayClusterTarget:
    """A Ray cluster reached through its dashboard's Serve REST API."""

    def __init__(self, dashboard_url: str, auth_token: str | None = None, timeout_s: float = 60.0) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.description = f"Ray cluster at {self.dashboard_url}"
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._client = httpx.Client(base_url=self.dashboard_url, headers=headers, timeout=timeout_s)

    def _request(self, method: str, path: str, attempts: int = 3, **kwargs: Any) -> httpx.Response:
        # Every call here is idempotent (GET, declarative PUT, DELETE), so a
        # dashboard that is momentarily overloaded (5xx, dropped connection)
        # is retried rather than failing a whole deploy.
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.HTTPError as error:
                if attempt == attempts:
                    raise ClusterError(
                        f"cannot reach the Ray dashboard at {self.dashboard_url}: {type(error).__name__}",
                        retryable=True,
                    ) from None
            else:
                if response.status_code < 500 or attempt == attempts:
                    break
            time.sleep(2.0 * attempt)
        if response.status_code >= 400:
            # The dashboard's text is about the config, never about patients:
            # show it, or a refused deploy cannot be diagnosed.
            raise ClusterError(
                f"the Ray dashboard refused {method} {path} with HTTP {response.status_code}: "
                f"{response.text[-1500:]}",
                retryable=response.status_code >= 500,
            )
        return response

    def apply(self, config: dict[str, Any], retry_s: float = 60.0) -> None:
        # The dashboard answers before its Serve module is up (seen under
        # load: HTTP 500 "cannot connect to unix socket dash_ServeHead", or a
        # refused connection). PUT is declarative, so retrying is safe.
        deadline = time.monotonic() + retry_s
        while True:
            try:
                self._request("PUT", "/api/serve/applications/", json=config)
                return
            except ClusterError as error:
                if not error.retryable or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def serve_details(self) -> dict[str, Any]:
        """Serve's whole status document (GET /api/serve/applications/): applications,
        their deployments and replicas, and direct-ingress target groups."""
        return self._request("GET", "/api/serve/applications/").json()

    def application_status(self) -> dict[str, dict[str, Any]]:
        apps = self.serve_details().get("applications") or {}
        return {
            name: {"status": details.get("status"),
                   "message": application_message(details.get("message") or "", details.get("deployments"))}
            for name, details in apps.items()
        }

    def delete_all(self, timeout_s: float = 120.0) -> None:
        """Shut Serve down and wait until its controller is gone.

        The dashboard answers the DELETE after at most 30 s while the controller
        may still be draining replicas (direct-ingress replicas take Ray's whole
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 30 s unless medserve set
        it to 0 for one machine: local_ray.ray_environment); a config applied in
        that window is dropped by the dying
        controller ("Ignoring apply_config request because Serve controller is
        shutting down") although the PUT answered 200.
        """
        self._request("DELETE", "/api/serve/applications/")
        deadline = time.monotonic() + timeout_s
        while self.serve_details().get("controller_info") and time.monotonic() < deadline:
            time.sleep(0.5)

    def ingress_targets(self, host_override: str | None = None) -> dict[str, list[str]]:
        """Application name -> base URLs of its ingress replicas' own HTTP ports.

        Only with Ray Serve's direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED=1);
        empty otherwise. Replicas report their node's address; ``host_override``
        replaces it where they listen elsewhere (loopback).
        """
        urls: dict[str, list[str]] = {}
        for group in self.serve_details().get("target_groups") or []:
            if str(group.get("protocol", "")).upper() != "HTTP" or not group.get("app_name"):
                continue
            urls[group["app_name"]] = [f"http://{host_override or t['ip']}:{t['port']}" for t in group.get("targets") or []]
        return urls

    def node_resources(self, wait_s: float = 30.0) -> list[dict[str, float]]:
        # Right after `ray start` the dashboard answers before the head node
        # has reported its resources; wait briefly for at least one node.
        deadline = time.monotonic() + wait_s
        while True:
            body = self._request("GET", "/api/v0/nodes", params={"detail": "1", "limit": "10000"}).json()
            nodes = [node for node in node_resources_from_state_api(body) if node]
            if nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def wait_until_running(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
        """Poll until every named application runs; ClusterError on failure or timeout."""
        deadline = time.monotonic() + timeout_s
        statuses: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            statuses = self.application_status()
            failed = {n: s for n, s in statuses.items() if n in names and s["status"] in FAILED_STATES}
            if failed:
                name, state = next(iter(failed.items()))
                raise ClusterError(f"application {name} failed to deploy: {state['message'][-1500:]}", app=name)
            if all(statuses.get(n, {}).get("status") == RUNNING for n in names):
                return statuses
            time.sleep(1.0)
        waiting = [n for n in names if statuses.get(n, {}).get("status") != RUNNING]
        raise ClusterError(f"applications not running after {timeout_s:.0f}s: {', '.join(waiting)}")


def node_resources_from_state_api(body: dict[str, Any]) -> list[dict[str, float]]:
    """Total resources of each alive node, from GET /api/v0/nodes?detail=1."""
    rows = body.get("data", {}).get("result", {}).get("result", [])
    return [dict(row.get("resources_total") or {}) for row in rows if row.get("state") == "ALIVE"]

"""Start and stop the local Ray instance that `medserve up` uses.

A state file under MEDSERVE_HOME records that medserve started it, so
`medserve down` stops only a Ray it started, never one it merely joined.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

import medserve

from medserve.controlplane.targets import RayClusterTarget
from medserve.errors import ClusterError
from medserve.settings import Settings, _read_or_create_secret

logger = logging.getLogger(__name__)

STATE_FILE = "ray-local.json"


@dataclass(frozen=True)
class RayConnection:
    address: str  # GCS address, host:port
    dashboard_url: str
    auth_token: str | None
    started_here: bool


def ray_auth_token(settings: Settings) -> str:
    """The token for Ray's own control plane (RAY_AUTH_MODE=token), kept under MEDSERVE_HOME."""
    return os.environ.get("RAY_AUTH_TOKEN") or _read_or_create_secret(settings.resolved_home / "ray-auth.token")


# Ray's switch for a one-machine Ray (its default on macOS and Windows). Ray replaces a loopback
# `--node-ip-address` with the machine's network address unless it is off, and then binds its gRPC servers,
# agents, metrics export and Ray Client server to that address or to every interface.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class NetworkListener:
    """A socket of a one-machine Ray that listens off loopback although medserve asks for loopback.

    Each is named, with the reason Ray cannot be held to loopback there, in docs/security.md
    ("What listens where"); tests/integration/test_local_binding.py fails on any other.
    """

    name: str
    component: str  # a substring of the listening process's command line
    addresses: tuple[str, ...]  # the addresses it listens on
    why: str

    def matches(self, ip: str, command_line: str) -> bool:
        return self.component in command_line and ip in self.addresses


# Measured with Ray 2.60 and the whole catalog applied (docs/security.md, "What listens where").
NETWORK_LISTENERS: tuple[NetworkListener, ...] = (
    NetworkListener(
        name="Ray Serve inter-deployment gRPC",
        component="ray::ServeReplica:",
        addresses=("::",),
        why="each Serve replica's handle-call server: ray/serve/_private/replica.py binds it to [::]:0 (every "
        "interface, a random port) with no setting to change it (ray-project/ray#64544); it takes Ray's token",
    ),
)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and the name localhost."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def named_network_listener(ip: str, command_line: str) -> bool:
    """True for a listener off loopback that NETWORK_LISTENERS names (Ray cannot be held to loopback there)."""
    return not is_loopback(ip) and any(listener.matches(ip, command_line) for listener in NETWORK_LISTENERS)


RAY_WORKER_NICENESS = "RAY_worker_niceness"


def run_replicas_at_normal_priority(env: dict[str, str]) -> None:
    """Ray starts its workers, so every Serve replica, at niceness 15 (its ``worker_niceness``) and keeps
    its own daemons at 0: on a busy node the raylet, GCS, dashboard and Serve controller then preempt
    the model engines. In a medserve cluster the replicas are the work: a llama.cpp answer streamed from
    its replica kept 0.83-0.93 of the engine's rate at 15 and 0.93-0.96 at 0 (docs/llm-serving.md). An
    operator's own value is kept."""
    env.setdefault(RAY_WORKER_NICENESS, "0")


def node_process_environment(settings: Settings, token: str) -> dict[str, str]:
    """What every Ray node medserve starts or joins needs in its environment, which its Serve
    replicas inherit: token auth, no usage reports, replicas at the daemons' priority, the Serve
    mode, and medserve's paths made absolute.

    Ray Serve reads its mode (RAY_SERVE_THROUGHPUT_OPTIMIZED) from each process's own environment
    when it starts, so a node that lacked it would run its replicas in Serve's default mode beside
    a head in the throughput-optimized one: a gateway replica there would open no direct-ingress
    port, and its model replicas would run their code in a separate thread.
    """
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    run_replicas_at_normal_priority(env)
    if settings.serve_throughput_optimized:
        # Direct ingress, gRPC between deployments (measured in `medserve bench`).
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    # Replicas resolve settings from their environment; make paths absolute so
    # they find the same home whatever their working directory.
    env["MEDSERVE_HOME"] = str(settings.resolved_home)
    # Replicas import the same medserve source as the process that starts
    # them (matters for checkouts beside an installed copy).
    source_root = str(Path(medserve.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


RAY_DIRECT_INGRESS_DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def drain_only_in_flight_requests_on_one_machine(settings: Settings, env: dict[str, str]) -> None:
    """With direct ingress, a stopping gateway replica keeps taking new requests on its own port for
    Ray's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s), so that a load balancer in front of
    that port can take it out first; every stop of the gateway (`medserve down`, a redeploy) waited
    the whole of it. On one machine with the gateway on loopback, nothing off the machine reaches the
    port, so nothing needs the time: 0 there, and Serve still finishes the in-flight requests (after
    its 2 s wait loop, as in its default mode). A cluster head, a gateway open to the network, and an
    operator's own value keep theirs."""
    if is_loopback(settings.ray_node_address) and is_loopback(settings.gateway_host):
        env.setdefault(RAY_DIRECT_INGRESS_DRAIN, "0")


def ray_environment(settings: Settings) -> dict[str, str]:
    """Environment for a Ray head that medserve starts: ``node_process_environment``, the database
    URL made absolute, every Ray port on loopback unless MEDSERVE_RAY_NODE_ADDRESS names a network address."""
    env = node_process_environment(settings, ray_auth_token(settings))
    if is_loopback(settings.ray_node_address):
        env[RAY_CLUSTER_SWITCH] = "0"
    else:
        env.pop(RAY_CLUSTER_SWITCH, None)
    drain_only_in_flight_requests_on_one_machine(settings, env)
    env["MEDSERVE_DATABASE_URL"] = settings.resolved_database_url
    return env


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _dashboard_up(url: str, token: str | None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(f"{url}/api/version", headers=headers, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_local_ray(settings: Settings, *, timeout_s: float = 120.0) -> RayConnection:
    """Start a head node (or reuse the one medserve started before).

    `ray start --block` runs as our child in its own session: terminating it
    stops exactly the Ray processes it started (unlike `ray stop`, which
    kills every Ray on the machine, other users' included).
    """
    home = settings.resolved_home
    home.mkdir(parents=True, exist_ok=True)
    state_path = home / STATE_FILE
    token = ray_auth_token(settings)
    dashboard_url = f"http://127.0.0.1:{settings.ray_dashboard_port}"
    address = f"{_host_for_url(settings.ray_node_address)}:{settings.ray_head_port}"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if _alive(int(state["pid"])) and _dashboard_up(dashboard_url, token):
            return RayConnection(address, dashboard_url, token, started_here=True)
        state_path.unlink()

    command = [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={settings.ray_head_port}",
        # Loopback by default, held there by RAY_CLUSTER_SWITCH (ray_environment); a head that other
        # nodes join advertises its cluster-network address instead.
        f"--node-ip-address={settings.ray_node_address}",
        # The dashboard (and its Serve REST API) listens on loopback only, on a multi-node head too.
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={settings.ray_dashboard_port}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    if settings.ray_num_cpus is not None:
        command.append(f"--num-cpus={settings.ray_num_cpus}")
    if settings.ray_temp_dir:
        # Session files and logs land here (tests scan them for patient ids).
        command.append(f"--temp-dir={Path(settings.ray_temp_dir).expanduser().resolve()}")
    log = (home / "ray-start.log").open("ab")
    process = subprocess.Popen(
        command, env=ray_environment(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    state_path.write_text(json.dumps({"pid": process.pid, "address": address, "dashboard_url": dashboard_url}))
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up(dashboard_url, token):
        if process.poll() is not None:
            state_path.unlink(missing_ok=True)
            raise ClusterError(f"`ray start` exited with {process.returncode}; see {home / 'ray-start.log'}")
        if time.monotonic() > deadline:
            raise ClusterError(f"the Ray dashboard did not come up in {timeout_s:.0f}s")
        time.sleep(0.5)
    return RayConnection(address, dashboard_url, token, started_here=True)


def stop_local_ray(settings: Settings, timeout_s: float = 60.0) -> bool:
    """Stop the Ray that medserve started, its Serve applications first; False when it started none.

    With Serve applications running, Ray's SIGTERM handler drains the node and waits up to its
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) for them; shut down first, they finish their
    in-flight requests and Ray's own stop takes 2-3 s here.
    """
    state_path = settings.resolved_home / STATE_FILE
    if not state_path.exists():
        return False
    state = json.loads(state_path.read_text())
    pid = int(state["pid"])
    if _alive(pid):
        try:
            RayClusterTarget(state["dashboard_url"], ray_auth_token(settings)).delete_all()
        except ClusterError as error:  # Ray is stopped all the same, and Serve with it
            logger.warning("Serve did not shut down before Ray: %s", error.message)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    state_path.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (else it stays a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

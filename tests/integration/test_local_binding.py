"""Local means local: every socket the Ray session listens on is on loopback.

The session fixture starts Ray the way `medserve up` does on one machine (start_local_ray) and applies
the whole catalog, so the gateway's proxy, its direct-ingress ports, every model replica, the
dashboard, its agents and the metrics export are all up when this test lists their sockets.
"""

from __future__ import annotations

import json

import psutil

from medserve.controlplane.local_ray import NETWORK_LISTENERS, STATE_FILE, is_loopback

from .conftest import Platform

# Ray Serve's direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT, defaults).
DIRECT_INGRESS_PORTS = (30000, 31000)


def _session_processes(platform: Platform) -> list[psutil.Process]:
    """The `ray start` that start_local_ray launched, everything below it, and any process whose command
    line names this session's Ray temp dir (a process Ray started that left the tree)."""
    state = json.loads((platform.settings.resolved_home / STATE_FILE).read_text())
    root = psutil.Process(int(state["pid"]))
    found = {process.pid: process for process in [root, *root.children(recursive=True)]}
    marker = str(platform.ray_temp_dir)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid not in found and marker in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
    return list(found.values())


def _listeners(processes: list[psutil.Process]) -> list[tuple[str, int, str, int]]:
    """(ip, port, process name, pid) of each TCP socket in LISTEN and each unconnected UDP socket."""
    found = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = " ".join(process.cmdline())[:120] or process.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited while we looked
        for connection in connections:
            listening = connection.status == psutil.CONN_LISTEN or (
                connection.status == psutil.CONN_NONE and not connection.raddr)
            if listening:
                found.append((connection.laddr.ip, connection.laddr.port, name, process.pid))
    return found


def test_every_listener_of_the_ray_session_is_on_loopback(platform: Platform):
    processes = _session_processes(platform)
    listeners = _listeners(processes)
    # The session is the whole platform: GCS, dashboard, raylet and agents, the gateway and every model replica.
    ports = {port for _, port, _, _ in listeners}
    settings = platform.settings
    assert {settings.ray_head_port, settings.ray_dashboard_port, settings.gateway_port} <= ports, sorted(ports)
    assert sum("ServeReplica:model-" in name for _, _, name, _ in listeners) >= 4, "the catalog's model replicas"
    off_loopback = [
        entry for entry in listeners
        if not is_loopback(entry[0]) and not any(allowed.matches(*entry) for allowed in NETWORK_LISTENERS)
    ]
    assert off_loopback == [], "\n".join(f"{ip}:{port} pid {pid} {name}" for ip, port, name, pid in off_loopback)


def test_only_the_gateway_listens_on_the_gateway_host(platform: Platform):
    """MEDSERVE_GATEWAY_HOST opens exactly what listens on it: the proxy and the gateway's replicas.
    No model replica has a direct-ingress HTTP port (Ray Serve would put it on the gateway's host)."""
    listeners = _listeners(_session_processes(platform))
    direct_ingress = [(port, name) for _, port, name, _ in listeners if DIRECT_INGRESS_PORTS[0] <= port <= DIRECT_INGRESS_PORTS[1]]
    assert direct_ingress, "the shared cluster runs with direct ingress (MEDSERVE_SERVE_THROUGHPUT_OPTIMIZED)"
    assert all("ServeReplica:gateway:" in name for _, name in direct_ingress), direct_ingress
    on_gateway_host = {
        name.split()[0] for ip, port, name, _ in listeners
        if ip == platform.settings.gateway_host and (port == platform.settings.gateway_port or (port, name) in direct_ingress)
    }
    assert on_gateway_host == {"ray::ProxyActor", "ray::ServeReplica:gateway:Gateway"}, on_gateway_host

"""Local means local: every socket the Ray session listens on is on loopback, but those Ray holds itself.

The session fixture starts Ray the way `medserve up` does on one machine (start_local_ray) and applies
the whole catalog, so the gateway's proxy, its direct-ingress ports, every model replica, the
dashboard, its agents and the metrics export are all up when these tests list their sockets. A second,
small platform with MEDSERVE_GATEWAY_HOST=0.0.0.0 shows that the setting opens the gateway and nothing else.
What listens where, and why Ray keeps one port per replica off loopback: docs/security.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from ray._common.network_utils import node_ip_address_from_perspective

from medserve.controlplane.local_ray import RAY_DIRECT_INGRESS_DRAIN, STATE_FILE, is_loopback, named_network_listener
from medserve.specs import load_catalog

from .conftest import Platform, running_platform

# Ray Serve's direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT, defaults).
DIRECT_INGRESS_PORTS = (30000, 31000)


def _is_direct_ingress(port: int) -> bool:
    return DIRECT_INGRESS_PORTS[0] <= port <= DIRECT_INGRESS_PORTS[1]


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
    assert {settings.ray_head_port, settings.ray_dashboard_port, settings.gateway_port,
            settings.gateway_listen_port} <= ports, sorted(ports)
    assert sum("ServeReplica:model-" in name for _, _, name, _ in listeners) >= 4, "the catalog's model replicas"
    off_loopback = [
        entry for entry in listeners
        if not is_loopback(entry[0]) and not named_network_listener(entry[0], entry[2])
    ]
    assert off_loopback == [], "\n".join(f"{ip}:{port} pid {pid} {name}" for ip, port, name, pid in off_loopback)


def test_what_ray_leaves_on_the_network_refuses_a_caller_without_rays_token(platform: Platform):
    """The allow-listed servers answer on the machine's network address, but not without Ray's token."""
    address = node_ip_address_from_perspective(None)
    assert not is_loopback(address), address
    listeners = _listeners(_session_processes(platform))
    allowed = [port for ip, port, name, pid in listeners
               if named_network_listener(ip, name)]
    assert len(allowed) >= 5, "one inter-deployment gRPC server per replica: the gateway and four models"
    for port in allowed:
        with grpc.insecure_channel(f"{address}:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (port, refused.value)
    # With the token the same call gets past the check (and fails on its empty request instead).
    with grpc.insecure_channel(f"{address}:{allowed[0]}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        with pytest.raises(grpc.RpcError) as failed:
            call(b"", timeout=10, metadata=[("authorization", f"Bearer {platform.env['RAY_AUTH_TOKEN']}")])
    assert failed.value.code() != grpc.StatusCode.UNAUTHENTICATED, failed.value


def test_no_model_replica_has_an_http_port_of_its_own(platform: Platform):
    """Ray Serve's direct ingress would give each model application's replica an HTTP port on the gateway's
    host; the model applications turn it off, so only gateway replicas have one."""
    listeners = _listeners(_session_processes(platform))
    direct_ingress = [(port, name) for _, port, name, _ in listeners if _is_direct_ingress(port)]
    assert direct_ingress, "the shared cluster runs with direct ingress (MEDSERVE_SERVE_THROUGHPUT_OPTIMIZED)"
    assert all("ServeReplica:gateway:" in name for _, name in direct_ingress), direct_ingress


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[Platform]:
    """A platform of its own with MEDSERVE_GATEWAY_HOST=0.0.0.0 and one model (the liver analyzer)."""
    specs = [spec for spec in load_catalog(repo_root / "deployments") if spec.name == "ct-liver-attenuation-hu"]
    with running_platform(tmp_path_factory.mktemp("medserve-open"), repo_root, specs=specs,
                          MEDSERVE_GATEWAY_HOST="0.0.0.0",
                          # No balancer in front of the test's gateway port: no 30 s wait for one at teardown.
                          **{RAY_DIRECT_INGRESS_DRAIN: "0"}) as platform:
        yield platform


@pytest.mark.slow
def test_the_gateway_host_setting_opens_the_gateway_and_nothing_else(open_gateway: Platform):
    # A replica reports its direct-ingress port to Serve's controller once it listens there.
    deadline = time.monotonic() + 60
    while not open_gateway.target.ingress_targets().get("gateway") and time.monotonic() < deadline:
        time.sleep(0.5)
    listeners = _listeners(_session_processes(open_gateway))
    opened = {
        (ip, port, name.split()[0]) for ip, port, name, pid in listeners
        if not is_loopback(ip) and not named_network_listener(ip, name)
    }
    gateway_ports = {(ip, port) for ip, port, name in opened if name == "ray::ServeReplica:gateway:Gateway"}
    own_port = ("0.0.0.0", open_gateway.settings.gateway_listen_port)
    assert opened == {("0.0.0.0", open_gateway.settings.gateway_port, "ray::ProxyActor")} | {
        (ip, port, "ray::ServeReplica:gateway:Gateway") for ip, port in gateway_ports}, opened
    # The gateway replica's own port, and its Serve direct-ingress port.
    direct_ingress = gateway_ports - {own_port}
    assert own_port in gateway_ports and len(direct_ingress) == 1, opened
    assert all(_is_direct_ingress(port) for _, port in direct_ingress), opened
    # Reached on the machine's network address, with the model behind it, on the gateway's own port and
    # through Serve's proxy.
    address = node_ip_address_from_perspective(None)
    assert not is_loopback(address), address
    for port in (open_gateway.settings.gateway_listen_port, open_gateway.settings.gateway_port):
        with httpx.Client(base_url=f"http://{address}:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {open_gateway.key()}"}) as client:
            models = client.get("/v1/models")
        assert models.status_code == 200, port
        assert [model["id"] for model in models.json()["data"]] == ["ct-liver-attenuation-hu"], port

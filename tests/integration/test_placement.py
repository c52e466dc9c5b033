"""A second Ray node joined the way `medserve cluster join` joins one hosts the replica that needs its resource.

On-prem sites without Kubernetes announce node pools as custom resources
(`radiology_gpu`); a spec asking for `resources.custom: {radiology_gpu: 1}`
must run there and nowhere else. Both nodes run on this machine here, so the
second one lets the OS pick the dashboard-agent port the head already holds.

Nodes cannot join the shared platform's head: it listens on loopback only, and Ray turns a loopback
`--address` into the machine's network address on a node that joins. So this module starts a head of its
own as an on-prem head is started, with MEDSERVE_RAY_NODE_ADDRESS set to this machine's network address,
and serves a small catalog there (the liver analyzer and the pancreas model that stays unplaceable).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray._common.network_utils import node_ip_address_from_perspective

from medserve.controlplane.cluster import (
    list_nodes,
    parse_join,
    replica_placements,
    start_node,
    stop_node,
    wait_for_node,
)
from medserve.controlplane.local_ray import RAY_DIRECT_INGRESS_DRAIN
from medserve.controlplane.render import app_name_for
from medserve.specs import DeploymentSpec, load_catalog
from tests.series_data import ct_series

from .conftest import Platform, json_of, new_patient_id, running_platform

pytestmark = pytest.mark.slow

POOL = {"radiology_gpu": 1.0}
MODEL = "ct-liver-attenuation-hu-radiology"


BASE = ("ct-liver-attenuation-hu", "ct-pancreas-screen")


def _base_specs(platform: Platform) -> list[DeploymentSpec]:
    """Two models: the liver analyzer, and the pancreas model that asks for the pool and a GPU share."""
    return [spec for spec in platform.catalog() if spec.name in BASE]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[Platform]:
    """A head that other nodes join: Ray advertises this machine's network address."""
    address = node_ip_address_from_perspective(None)
    assert address and not address.startswith("127."), f"no network address to advertise here ({address})"
    with running_platform(tmp_path_factory.mktemp("medserve-head"), repo_root,
                          specs=[s for s in load_catalog(repo_root / "deployments") if s.name in BASE],
                          MEDSERVE_RAY_NODE_ADDRESS=address,
                          # No balancer in front of the test's gateway port: no 30 s wait for one at teardown.
                          **{RAY_DIRECT_INGRESS_DRAIN: "0"}) as platform:
        yield platform


def _environ(pid: int | None) -> dict[str, str]:
    """A process's environment as it started (both nodes run on this machine here)."""
    assert pid is not None
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def _pool_spec(platform: Platform) -> DeploymentSpec:
    """The built-in liver analyzer (no weights, loads at once), renamed and pinned to the radiology pool."""
    base = next(s for s in platform.catalog() if s.name == "ct-liver-attenuation-hu")
    assert isinstance(base, DeploymentSpec)
    # The model name changes too: the gateway finds models by name, and the
    # analyzer's pinned digest covers its parameters, not its name.
    return base.model_copy(update={
        "name": MODEL,
        "model": base.model.model_copy(update={"name": MODEL}),
        # No CPU: the pool node announces none, so nothing but the pool's replicas fits there (Serve spreads
        # replicas over nodes, and the gateway, redeployed by this apply, would otherwise land there too).
        "resources": base.resources.model_copy(update={"custom": POOL, "num_cpus": 0.0}),
    })


def test_replica_needing_a_pool_resource_runs_on_the_node_that_announces_it(head: Platform):
    platform = head
    address = platform.settings.ray_node_address
    token = platform.env["RAY_AUTH_TOKEN"]
    dashboard = platform.target.dashboard_url
    head_nodes = list_nodes(dashboard, token)
    assert all("radiology_gpu" not in node.resources for node in head_nodes)
    join = parse_join(
        address=f"{address}:{platform.settings.ray_head_port}",
        resources={"radiology_gpu": 1},
        num_cpus=0,
        num_gpus=0,
        node_ip_address=address,
        share_machine=True,
    )
    node = start_node(join, token, platform.settings, log_path=platform.settings.resolved_home / "ray-node.log")
    spec = _pool_spec(platform)
    try:
        joined = wait_for_node(dashboard, token, resources=POOL, exclude={n.node_id for n in head_nodes})
        assert not joined.is_head and joined.resources["radiology_gpu"] == 1.0 and not joined.resources.get("CPU")

        result = platform.apply([*_base_specs(platform), spec])
        planned = {item.spec.name: item for item in result.plan}
        assert planned[MODEL].deploy, planned[MODEL].reason
        # The pancreas model also asks for the pool, but for a GPU share too: still skipped.
        assert not planned["ct-pancreas-screen"].deploy

        app = app_name_for(spec)
        placements = [p for p in replica_placements(dashboard, token) if p.app == app]
        assert len(placements) == 1
        assert placements[0].node_id == joined.node_id
        # Every other replica (the gateway, the liver analyzer) runs on the head: none needs the pool.
        others = [p for p in replica_placements(dashboard, token) if p.app != app]
        assert others and all(p.node_id != joined.node_id for p in others)
        # Ray Serve reads its mode from each replica's own environment: a replica on the joined node runs
        # in the head's (direct ingress, gRPC between deployments) and at the head's priority.
        on_head, on_node = _environ(others[0].pid), _environ(placements[0].pid)
        for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_worker_niceness"):
            assert on_node.get(name) == on_head.get(name), name
        assert on_node.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"

        patient = new_patient_id()
        with platform.client(platform.key()) as client:
            response = client.post(
                f"/v1/imaging/{MODEL}",
                content=ct_series(1)[0],  # one non-contrast CT slice: the analyzer's default ROI
                headers={"Content-Type": "application/dicom", "X-Patient-Id": patient},
            )
        body = json_of(response)
        assert response.status_code == 200, body
        assert body["model"] == MODEL and body["status"] == "draft"
        assert body["findings"][0]["code"] == "liver-attenuation" and body["findings"][0]["unit"] == "HU"
        rows = platform.audit_rows_for_patient(patient)
        assert [(row.model_name, row.outcome, row.http_status) for row in rows] == [(MODEL, "ok", 200)]
    finally:
        try:
            platform.apply(_base_specs(platform))  # the pool model goes, the others stay
        finally:
            stop_node(node)

    assert node.process.returncode is not None
    # Only the joined node left: the head (and the platform on it) still serves.
    deadline = time.monotonic() + 60
    while True:
        states = {n.node_id: n.alive for n in list_nodes(dashboard, token)}
        if not states.get(joined.node_id) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert states[joined.node_id] is False
    assert all(states[n.node_id] for n in head_nodes)
    with platform.client() as client:
        assert client.get("/healthz").status_code == 200

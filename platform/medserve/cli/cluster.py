"""`medserve cluster`: on-prem Ray nodes without Kubernetes (join this machine, list the nodes)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from medserve.cli.common import fail, load_settings, ray_token, remote_dashboard_url, up_state


@click.group()
def cluster() -> None:
    """On-prem Ray nodes: join this machine to the medserve head, list the nodes."""


@cluster.command("join")
@click.option("--address", required=True,
              help="The head's GCS address HOST:PORT (MEDSERVE_RAY_HEAD_PORT, default 6379).")
@click.option("--resources", "resources_json", default="{}", show_default=True,
              help='Custom resources this node announces (JSON), e.g. \'{"radiology_gpu": 1}\'.')
@click.option("--num-cpus", type=int, default=None, help="Logical CPUs to announce (default: Ray detects).")
@click.option("--num-gpus", type=int, default=None, help="GPUs to announce (default: Ray detects).")
@click.option("--node-ip-address", default=None, help="Address the head reaches this node on (default: Ray picks).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A copy of the head's MEDSERVE_HOME/ray-auth.token (default: RAY_AUTH_TOKEN, else this "
                   "machine's MEDSERVE_HOME/ray-auth.token).")
@click.option("--print-only", is_flag=True, help="Print the command to run on the node (token read from "
              "RAY_AUTH_TOKEN or the token file, never printed) and exit.")
def cluster_join(address: str, resources_json: str, num_cpus: int | None, num_gpus: int | None,
                 node_ip_address: str | None, token_file: Path | None, print_only: bool) -> None:
    """Join this machine to the medserve Ray head as a worker node; Ctrl-C stops exactly this node."""
    from medserve.controlplane.cluster import (
        join_token, parse_join, parse_resources, shell_command, start_node, stop_node, unshared_settings,
    )

    join = parse_join(address=address, resources=parse_resources(resources_json), num_cpus=num_cpus,
                      num_gpus=num_gpus, node_ip_address=node_ip_address)
    settings = load_settings()
    if print_only:
        click.echo(shell_command(join, token_file, throughput_optimized=settings.serve_throughput_optimized))
        return
    token = join_token(settings, token_file)
    for warning in unshared_settings(settings):
        click.echo(f"warning: {warning}", err=True)
    log_path = settings.resolved_home / "ray-node.log"
    node = start_node(join, token, settings, log_path=log_path)
    announced = json.dumps(join.resources) if join.resources else "no custom resources"
    click.echo(f"joined {join.address} announcing {announced} (log: {log_path}). Press Ctrl-C to leave.")
    stopping = {"flag": False}

    def _stop(_signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stopping["flag"] and node.process.poll() is None:
        time.sleep(0.5)
    if node.process.poll() is not None:
        fail(f"the node stopped on its own (exit {node.process.returncode}); see {log_path}")
    stop_node(node)
    click.echo("node stopped.")


@cluster.command("nodes")
@click.option("--dashboard", "dashboard_url", default=None,
              help="Ray dashboard URL (default: the Ray `medserve up` uses here, else RAY_ADDRESS).")
def cluster_nodes(dashboard_url: str | None) -> None:
    """List the cluster's nodes: id, address, alive, resources."""
    from medserve.controlplane.cluster import list_nodes

    settings = load_settings()
    state = up_state(settings) if dashboard_url is None else None
    token = os.environ.get("RAY_AUTH_TOKEN")
    if state is not None:
        dashboard_url = state["dashboard_url"]
        token = ray_token(settings, state)
    elif dashboard_url is None and os.environ.get("RAY_ADDRESS"):
        dashboard_url = remote_dashboard_url(os.environ["RAY_ADDRESS"])
    if dashboard_url is None:
        fail("no Ray cluster known here: run on the head after `medserve up`, or give --dashboard or RAY_ADDRESS")
    for node in list_nodes(dashboard_url or "", token):
        role = "head" if node.is_head else "worker"
        resources = ", ".join(f"{name}={amount:g}" for name, amount in sorted(node.resources.items())
                              if not name.startswith("node:"))
        click.echo(f"{node.node_id}  {node.address:<15} {role:<6} {'alive' if node.alive else 'dead':<5}  {resources}")

"""`medserve up` and `down`: the platform on this machine (local Ray, or the cluster at RAY_ADDRESS)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from medserve.cli.common import (
    DEMO_KEY_FILE, UP_STATE_FILE, load_settings, ray_token, remote_dashboard_url, render_options, up_state,
)
from medserve.errors import MedserveError
from medserve.settings import Settings


def _ensure_demo_key(settings: Settings) -> str:
    """A clinical-app key for trying the platform, kept (0600) under MEDSERVE_HOME."""
    from medserve.db.engine import session_scope
    from medserve.errors import AuthenticationError
    from medserve.security.api_keys import create_api_key, verify_api_key

    path = settings.resolved_home / DEMO_KEY_FILE
    url = settings.resolved_database_url
    if path.exists():
        key = path.read_text().strip()
        try:
            with session_scope(url) as session:
                verify_api_key(session, key)
            return key
        except AuthenticationError:
            pass  # the database was reset or the key revoked: make a new one
    with session_scope(url) as session:
        _, key = create_api_key(session, name="demo clinical app", role="clinical-app")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


PROMETHEUS_DIR = "prometheus"


def _show_metrics(settings: Settings, dashboard_url: str, token: str | None, with_prometheus: bool) -> None:
    """Print each node's metrics endpoint; with_prometheus: start a local Prometheus scraping them."""
    import shutil

    from medserve.controlplane.prometheus import default_rule_files, metrics_targets, start_prometheus

    try:
        targets = metrics_targets(dashboard_url, token)
    except MedserveError as error:
        click.echo(f"metrics: {error.message}", err=True)
        return
    click.echo("metrics (medserve's as ray_medserve_*, beside Ray's and Ray Serve's), one endpoint per Ray node:")
    for target in targets:
        click.echo(f"  http://{target}/metrics")
    if not with_prometheus:
        click.echo("  (dashboards and alert rules: monitoring/; `up --with-prometheus` starts a local Prometheus)")
        return
    if shutil.which("prometheus") is None:
        click.echo("  --with-prometheus: prometheus is not installed (Debian: apt-get install prometheus)", err=True)
        return
    rule_files = default_rule_files(Path.cwd())
    try:
        server = start_prometheus(settings.resolved_home / PROMETHEUS_DIR, targets, port=settings.prometheus_port,
                                  rule_files=rule_files)
    except MedserveError as error:
        click.echo(f"  --with-prometheus: {error.message}", err=True)
        return
    click.echo(f"Prometheus: {server.url}  ({len(rule_files)} rule file(s) loaded; data in {server.directory})")


@click.command()
@click.option("--detach", is_flag=True, help="Return once serving instead of waiting for Ctrl-C.")
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None)
@click.option("--with-prometheus", is_flag=True,
              help="Also start a local Prometheus (when installed) scraping the platform; `down` stops it.")
def up(detach: bool, deployments_dir: Path | None, with_prometheus: bool) -> None:
    """Upgrade the database, start Ray, apply the catalog, serve the gateway."""
    from medserve.controlplane.local_ray import start_local_ray
    from medserve.controlplane.reconcile import apply_catalog
    from medserve.controlplane.targets import RayClusterTarget
    from medserve.db.engine import upgrade as run_upgrade
    from medserve.specs import load_catalog

    settings = load_settings()
    home = settings.resolved_home
    home.mkdir(parents=True, exist_ok=True)
    specs = load_catalog(deployments_dir or settings.deployments_dir)
    url = settings.resolved_database_url
    run_upgrade(url)
    settings.pseudonym_key_bytes()  # create the keys before replicas race for them
    settings.audit_signing_key_bytes()
    demo_key = _ensure_demo_key(settings)

    ray_address = os.environ.get("RAY_ADDRESS")
    if ray_address:
        dashboard_url, token, started_ray = remote_dashboard_url(ray_address), os.environ.get("RAY_AUTH_TOKEN"), False
        click.echo(f"Using the Ray cluster at {dashboard_url}")
    else:
        from medserve.controlplane.local_ray import is_loopback

        where = ("every port on loopback" if is_loopback(settings.ray_node_address)
                 else f"nodes join at {settings.ray_node_address}:{settings.ray_head_port}, dashboard on loopback")
        click.echo(f"Starting a local Ray instance (token auth on, {where})...")
        connection = start_local_ray(settings)
        dashboard_url, token, started_ray = connection.dashboard_url, connection.auth_token, True
    (home / UP_STATE_FILE).write_text(json.dumps({
        "dashboard_url": dashboard_url,
        "started_ray": started_ray,
        "deployments_dir": str((deployments_dir or settings.deployments_dir).resolve()),
        "gateway_url": settings.gateway_url,
    }))

    target = RayClusterTarget(dashboard_url, token)
    click.echo(f"Applying {len(specs)} deployment spec(s) to {target.description}...")
    result = apply_catalog(url, specs, target, render_options(settings),
                           require_approved=settings.require_approved_versions)
    for item in result.plan:
        if item.deploy:
            served = ", ".join(result.versions.get(item.spec.name, [item.spec.model.version]))
            click.echo(f"  serving  {item.spec.name}: {item.spec.model.name} {served}")
        else:
            click.echo(f"  skipped  {item.spec.name}: {item.reason}")
    from medserve.specs import pipelines_of

    for pipeline in pipelines_of(specs):
        click.echo(f"  pipeline {pipeline.name}: {', '.join(step.name for step in pipeline.steps)}")
    base = settings.gateway_url
    click.echo("")
    click.echo(f"medserve gateway: {base}  (health: {base}/healthz, models: {base}/v1/models)")
    if settings.gateway_listen_port:
        click.echo(f"  the gateway's own port, answered by its replicas; through Ray Serve's proxy: "
                   f"{settings.serve_proxy_url}")
    if settings.serve_throughput_optimized:
        loopback = settings.gateway_host if settings.gateway_host in ("127.0.0.1", "localhost", "::1") else None
        for replica_url in target.ingress_targets(loopback).get("gateway", []):
            click.echo(f"  gateway replica, direct ingress (no proxy hop): {replica_url}")
    click.echo(f"demo API key (clinical-app): {demo_key}")
    click.echo(f'try: curl -H "Authorization: Bearer {demo_key}" {base}/v1/models')
    click.echo(f"Ray dashboard: {dashboard_url}")
    _show_metrics(settings, dashboard_url, token, with_prometheus)
    if detach:
        click.echo("Detached; stop with `medserve down`.")
        return

    click.echo("Serving. Press Ctrl-C (or run `medserve down`) to stop.")
    stopping = {"flag": False}

    def _stop(_signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    state_path = home / UP_STATE_FILE
    while not stopping["flag"] and state_path.exists():
        time.sleep(0.5)
    if state_path.exists():
        click.echo("\nStopping...")
        _shutdown(settings, target, started_ray)
    else:
        click.echo("\nStopped by `medserve down`.")


def _shutdown(settings: Settings, target: Any, started_ray: bool) -> None:
    from medserve.controlplane.local_ray import stop_local_ray
    from medserve.controlplane.prometheus import stop_prometheus

    if stop_prometheus(settings.resolved_home / PROMETHEUS_DIR):
        click.echo("Prometheus stopped.")

    # Ray that `up` started goes with its Serve applications (stop_local_ray shuts them down first).
    if not (started_ray and stop_local_ray(settings)):
        try:
            target.delete_all()
        except MedserveError as error:
            click.echo(f"could not remove the Serve applications: {error.message}", err=True)
    (settings.resolved_home / UP_STATE_FILE).unlink(missing_ok=True)
    click.echo("medserve stopped.")


@click.command()
def down() -> None:
    """Stop what `medserve up` started: its Serve applications, and Ray if it started Ray."""
    from medserve.controlplane.targets import RayClusterTarget

    settings = load_settings()
    state = up_state(settings)
    if state is None:
        click.echo("Nothing to stop: medserve is not up here.")
        return
    _shutdown(settings, RayClusterTarget(state["dashboard_url"], ray_token(settings, state)), state["started_ray"])

"""`medserve reconcile` and `status`: the cluster medserve serves on (KubeRay, a Ray dashboard, or `up`'s)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from medserve.cli.common import fail, load_settings, ray_token, remote_dashboard_url, render_options, up_state
from medserve.errors import MedserveError


def _kuberay_options(command: Any) -> Any:
    """--namespace and --rayservice, shared by `reconcile` and `status`."""
    command = click.option(
        "--rayservice", default="medserve", show_default=True, help="Name of the RayService (kuberay target)."
    )(command)
    command = click.option(
        "--namespace",
        default=_pod_namespace,
        show_default="the pod's namespace, else default",
        help="Namespace of the RayService (kuberay target).",
    )(command)
    return command


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def _target(target: str, namespace: str, rayservice: str) -> Any:
    if target == "kuberay":
        from medserve.controlplane.kuberay import KubeRayTarget

        return KubeRayTarget(namespace, rayservice)
    from medserve.controlplane.targets import RayClusterTarget

    ray_address = os.environ.get("RAY_ADDRESS")
    if not ray_address:
        fail("--target ray needs RAY_ADDRESS (the Ray dashboard URL)")
    return RayClusterTarget(remote_dashboard_url(ray_address or ""), os.environ.get("RAY_AUTH_TOKEN"))


@click.command()
@click.option(
    "--target",
    type=click.Choice(["kuberay", "ray"]),
    required=True,
    help="kuberay: patch a RayService's serveConfigV2; ray: the Ray dashboard at RAY_ADDRESS.",
)
@_kuberay_options
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None)
@click.option("--watch", is_flag=True, help="Keep reconciling every --interval seconds until stopped.")
@click.option("--interval", type=click.FloatRange(min=1.0), default=60.0, show_default=True)
@click.option(
    "--heartbeat-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Touch this file after each successful pass (a liveness probe checks its age).",
)
def reconcile(
    target: str,
    namespace: str,
    rayservice: str,
    deployments_dir: Path | None,
    watch: bool,
    interval: float,
    heartbeat_file: Path | None,
) -> None:
    """Apply the catalog to a cluster once (or, with --watch, again and again).

    Records every spec in the registry, skips what the cluster cannot host (with
    the reason), renders one Serve config and hands it to the target. Engines
    are not imported here: they run in the Ray image, not in this process.
    """
    from medserve.controlplane.reconcile import apply_catalog
    from medserve.specs import load_catalog

    settings = load_settings()
    url = settings.resolved_database_url
    serve_target = _target(target, namespace, rayservice)
    stopping = {"flag": False}

    def _stop(_signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    if watch:
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
    while True:
        try:
            specs = load_catalog(deployments_dir or settings.deployments_dir)
            result = apply_catalog(
                url,
                specs,
                serve_target,
                render_options(settings),
                registered_by=f"medserve reconcile ({target})",
                check_engines=False,
                require_approved=settings.require_approved_versions,
            )
        except MedserveError as error:
            if not watch:
                raise
            click.echo(f"reconcile failed, retrying in {interval:g}s: [{error.code}] {error.message}", err=True)
        else:
            served = [item.spec.name for item in result.plan if item.deploy]
            skipped = [f"{item.spec.name} ({item.reason})" for item in result.plan if not item.deploy]
            click.echo(f"applied to {serve_target.description}: serving {', '.join(served) or 'nothing'}")
            for line in skipped:
                click.echo(f"  skipped {line}")
            if heartbeat_file is not None:
                heartbeat_file.parent.mkdir(parents=True, exist_ok=True)
                heartbeat_file.touch()
        if not watch:
            return
        deadline = time.monotonic() + interval
        while not stopping["flag"] and time.monotonic() < deadline:
            time.sleep(0.2)
        if stopping["flag"]:
            return


@click.command()
@click.option(
    "--target",
    type=click.Choice(["local", "kuberay", "ray"]),
    default="local",
    show_default=True,
    help="local: what `medserve up` started here; kuberay: a RayService; ray: the dashboard at RAY_ADDRESS.",
)
@_kuberay_options
@click.option("--gateway-url", default=None,
              help="Gateway whose readiness to show (default: the one `medserve up` started here).")
def status(target: str, namespace: str, rayservice: str, gateway_url: str | None) -> None:
    """Show each Serve application's state, then the gateway's: audit spool depth and state age."""
    from medserve.controlplane.targets import FAILED_STATES, RayClusterTarget

    if target != "local":
        source = _target(target, namespace, rayservice)
    else:
        settings = load_settings()
        state = up_state(settings)
        if state is None:
            fail("medserve is not up here (no `medserve up` state found)")
        source = RayClusterTarget(state["dashboard_url"], ray_token(settings, state))
        gateway_url = gateway_url or state.get("gateway_url")
    apps = source.application_status()
    if not apps:
        click.echo(f"{source.description}: no Serve application reported yet")
    for name, app in sorted(apps.items()):
        if app["status"] in FAILED_STATES:
            # The reason is at the end of a failed application's message (each failed deployment's own).
            click.echo(f"{name:<32} {app['status']:<14}\n    {app['message']}")
        else:
            click.echo(f"{name:<32} {app['status']:<14} {app['message'][:120]}")
    if gateway_url:
        click.echo(_gateway_health_line(gateway_url))


def _gateway_health_line(gateway_url: str) -> str:
    """One gateway replica's /readyz, as one line: readiness, audit spool depth, age of its known state."""
    import httpx

    try:
        body = httpx.get(f"{gateway_url.rstrip('/')}/readyz", timeout=10).json()
    except (httpx.HTTPError, ValueError) as error:
        return f"gateway {gateway_url}: no answer ({type(error).__name__})"
    audit, ages = body.get("audit", {}), body.get("state_age_s", {})
    age_text = ", ".join(f"{name} {'never loaded' if age is None else f'{age:g} s'}" for name, age in sorted(ages.items()))
    line = (f"gateway {gateway_url}: {body.get('status')}; database {body.get('database')}; "
            f"audit spool {audit.get('spooled')} record(s), queue {audit.get('queued')}; state age: {age_text}")
    return line + "".join(f"\n  {reason}" for reason in body.get("reasons", []))

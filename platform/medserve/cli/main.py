"""`medserve`: validate specs, manage the database and keys, bring the platform up and down."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from medserve.errors import MedserveError
from medserve.settings import Settings

UP_STATE_FILE = "up.json"
DEMO_KEY_FILE = "demo-api-key"


def _settings() -> Settings:
    return Settings()


def _fail(message: str, code: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MedserveError as error:
        _fail(f"error [{error.code}]: {error.message}")


@click.group()
def cli() -> None:
    """medserve: audited, access-controlled serving of clinical AI models on Ray Serve."""


# --- specs -----------------------------------------------------------------


def _expand(paths: tuple[str, ...]) -> list[Path]:
    from medserve.specs import spec_files

    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        files.extend(spec_files(path) if path.is_dir() else [path])
    return files


@cli.command()
@click.argument("paths", nargs=-1, required=True)
def validate(paths: tuple[str, ...]) -> None:
    """Check deployment spec files (or directories of them); non-zero exit on any problem."""
    from medserve.errors import SpecError
    from medserve.specs import load_spec

    problems = 0
    files = _expand(paths)
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as error:
            problems += 1
            click.echo(error.message, err=True)
        else:
            click.echo(f"{path}: ok ({spec.name}: {spec.model.name} {spec.model.version}, {spec.model.engine})")
    if problems:
        _fail(f"{problems} of {len(files)} spec file(s) invalid")
    if not files:
        _fail("no spec files found")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of a deployment spec."""
    from medserve.specs import DeploymentSpec

    click.echo(json.dumps(DeploymentSpec.model_json_schema(), indent=2))


@cli.command()
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None)
def render(deployments_dir: Path | None) -> None:
    """Print the Ray Serve config rendered from the catalog (all specs, no capacity check)."""
    from medserve.controlplane.render import render_serve_config
    from medserve.specs import load_catalog

    settings = _settings()
    specs = load_catalog(deployments_dir or settings.deployments_dir)
    click.echo(json.dumps(render_serve_config(specs, _render_options(settings)), indent=2))


@cli.group()
def artifact() -> None:
    """Model artifacts."""


@artifact.command("hash")
@click.argument("uri")
def artifact_hash(uri: str) -> None:
    """Print the sha256 a spec should pin for an artifact (file, directory or package:// URI)."""
    from medserve.engines.artifacts import artifact_sha256, resolve_artifact

    click.echo(artifact_sha256(resolve_artifact(uri)))


# --- database ----------------------------------------------------------------


@cli.group()
def db() -> None:
    """The registry and audit database."""


@db.command()
def upgrade() -> None:
    """Apply all migrations (run before starting a new release)."""
    from medserve.db.engine import current_revision, upgrade as run_upgrade

    url = _settings().resolved_database_url
    run_upgrade(url)
    click.echo(f"database at revision {current_revision(url)}")


# --- keys ----------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """API keys for applications and people."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option(
    "--role", required=True, type=click.Choice(["clinical-app", "clinician", "admin", "auditor", "ops"])
)
@click.option("--department", default=None, help="Bind the key to one department.")
@click.option("--expires-in-days", type=int, default=None, help="Expire the key after this many days.")
def keys_create(name: str, role: str, department: str | None, expires_in_days: int | None) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from medserve.db.engine import session_scope
    from medserve.db.models import utcnow
    from medserve.security.api_keys import create_api_key

    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with session_scope(_settings().resolved_database_url) as session:
        row, plaintext = create_api_key(session, name=name, role=role, department=department, expires_at=expires)
        key_id = row.key_id
    click.echo(plaintext)
    click.echo(f"key id {key_id} ({role}); store it now: it cannot be shown again.", err=True)


@keys.command("list")
def keys_list() -> None:
    """List keys (ids, names, roles; never secrets)."""
    from sqlalchemy import select

    from medserve.db.engine import session_scope
    from medserve.db.models import ApiKey

    with session_scope(_settings().resolved_database_url) as session:
        for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            state = "revoked" if row.revoked_at else "active"
            click.echo(f"{row.key_id}  {row.role:<12} {row.department or '-':<14} {state:<8} {row.name}")


# --- audit ----------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """The audit trail."""


@audit.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--model", default=None, help="Only records for this model.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_list(limit: int, model: str | None, as_json: bool) -> None:
    """Newest audit records first."""
    from medserve.audit.queries import list_records

    for record in list_records(_settings().resolved_database_url, limit=limit, model=model):
        if as_json:
            click.echo(json.dumps(record))
        else:
            click.echo(
                f"{record['created_at']}  {record['id']}  {record['operation']:<16} "
                f"{record['model_name'] or '-'}@{record['model_version'] or '-'}  "
                f"{record['outcome']:<9} {record['http_status']} {record['error_code'] or ''}  "
                f"{record['caller_name'] or '-'}  {record['latency_ms']:.1f} ms"
            )


# --- platform lifecycle ---------------------------------------------------------


def _render_options(settings: Settings):  # type: ignore[no-untyped-def]
    from medserve.controlplane.render import GATEWAY_SETTING_NAMES, RenderOptions

    return RenderOptions(
        http_host=settings.gateway_host,
        http_port=settings.gateway_port,
        gateway_settings={name: getattr(settings, name) for name in GATEWAY_SETTING_NAMES},
    )


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


def _remote_dashboard_url(ray_address: str) -> str:
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    host = ray_address.removeprefix("ray://").split(":")[0]
    return f"http://{host}:8265"


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


@cli.command()
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

    settings = _settings()
    home = settings.resolved_home
    home.mkdir(parents=True, exist_ok=True)
    specs = load_catalog(deployments_dir or settings.deployments_dir)
    url = settings.resolved_database_url
    run_upgrade(url)
    settings.pseudonym_key_bytes()  # create the key before replicas race for it
    demo_key = _ensure_demo_key(settings)

    ray_address = os.environ.get("RAY_ADDRESS")
    if ray_address:
        dashboard_url, token, started_ray = _remote_dashboard_url(ray_address), os.environ.get("RAY_AUTH_TOKEN"), False
        click.echo(f"Using the Ray cluster at {dashboard_url}")
    else:
        click.echo("Starting a local Ray instance (token auth on, dashboard on loopback)...")
        connection = start_local_ray(settings)
        dashboard_url, token, started_ray = connection.dashboard_url, connection.auth_token, True
    (home / UP_STATE_FILE).write_text(json.dumps({"dashboard_url": dashboard_url, "started_ray": started_ray}))

    target = RayClusterTarget(dashboard_url, token)
    click.echo(f"Applying {len(specs)} deployment spec(s) to {target.description}...")
    result = apply_catalog(url, specs, target, _render_options(settings))
    for item in result.plan:
        if item.deploy:
            click.echo(f"  serving  {item.spec.name}: {item.spec.model.name} {item.spec.model.version}")
        else:
            click.echo(f"  skipped  {item.spec.name}: {item.reason}")
    base = f"http://{settings.gateway_host}:{settings.gateway_port}"
    click.echo("")
    click.echo(f"medserve gateway: {base}  (health: {base}/healthz, models: {base}/v1/models)")
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

    try:
        target.delete_all()
    except MedserveError as error:
        click.echo(f"could not remove the Serve applications: {error.message}", err=True)
    if started_ray:
        stop_local_ray(settings)
    (settings.resolved_home / UP_STATE_FILE).unlink(missing_ok=True)
    click.echo("medserve stopped.")


@cli.command()
def down() -> None:
    """Stop what `medserve up` started: its Serve applications, and Ray if it started Ray."""
    from medserve.controlplane.local_ray import ray_auth_token
    from medserve.controlplane.targets import RayClusterTarget

    settings = _settings()
    state_path = settings.resolved_home / UP_STATE_FILE
    if not state_path.exists():
        click.echo("Nothing to stop: medserve is not up here.")
        return
    state = json.loads(state_path.read_text())
    token = ray_auth_token(settings) if state["started_ray"] else os.environ.get("RAY_AUTH_TOKEN")
    _shutdown(settings, RayClusterTarget(state["dashboard_url"], token), state["started_ray"])


@cli.command()
def status() -> None:
    """Show each Serve application's state."""
    from medserve.controlplane.local_ray import ray_auth_token
    from medserve.controlplane.targets import RayClusterTarget

    settings = _settings()
    state_path = settings.resolved_home / UP_STATE_FILE
    if not state_path.exists():
        _fail("medserve is not up here (no `medserve up` state found)")
    state = json.loads(state_path.read_text())
    token = ray_auth_token(settings) if state["started_ray"] else os.environ.get("RAY_AUTH_TOKEN")
    for name, app in sorted(RayClusterTarget(state["dashboard_url"], token).application_status().items()):
        click.echo(f"{name:<32} {app['status']:<14} {app['message'][:120]}")


if __name__ == "__main__":
    main()

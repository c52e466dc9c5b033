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
    from medserve.specs import PipelineSpec, check_pipeline_steps, load_spec

    problems = 0
    files = _expand(paths)
    loaded = []
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as error:
            problems += 1
            click.echo(error.message, err=True)
        else:
            loaded.append(spec)
            if isinstance(spec, PipelineSpec):
                steps = ", ".join(f"{step.name}={step.model}" for step in spec.steps)
                click.echo(f"{path}: ok ({spec.name}: pipeline {spec.version}, steps {steps})")
            else:
                click.echo(f"{path}: ok ({spec.name}: {spec.model.name} {spec.model.version}, {spec.model.engine})")
    if not problems and any(Path(raw).is_dir() for raw in paths):
        try:  # a whole catalog: pipeline steps must name its models
            check_pipeline_steps(loaded)
        except SpecError as error:
            problems += 1
            click.echo(error.message, err=True)
    if problems:
        _fail(f"{problems} of {len(files)} spec file(s) invalid")
    if not files:
        _fail("no spec files found")


@cli.command()
@click.option("--kind", type=click.Choice(["deployment", "pipeline"]), default="deployment", show_default=True)
def schema(kind: str) -> None:
    """Print the JSON Schema of a deployment (or pipeline) spec."""
    from medserve.specs import DeploymentSpec, PipelineSpec

    model = PipelineSpec if kind == "pipeline" else DeploymentSpec
    click.echo(json.dumps(model.model_json_schema(), indent=2))


@cli.command()
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["json", "yaml"]),
    default="json",
    show_default=True,
    help="yaml: the spelling KubeRay's serveConfigV2 and the Helm chart carry.",
)
def render(deployments_dir: Path | None, output_format: str) -> None:
    """Print the Ray Serve config rendered from the catalog (all specs, no capacity check)."""
    from medserve.controlplane.render import render_serve_config
    from medserve.specs import load_catalog

    settings = _settings()
    specs = load_catalog(deployments_dir or settings.deployments_dir)
    config = render_serve_config(specs, _render_options(settings))
    if output_format == "yaml":
        from medserve.controlplane.kuberay import serve_config_yaml

        click.echo(serve_config_yaml(config), nl=False)
    else:
        click.echo(json.dumps(config, indent=2))


@cli.group()
def artifact() -> None:
    """Model artifacts."""


@artifact.command("hash")
@click.argument("uri", required=False)
@click.option("--spec", "spec_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="A built-in analyzer's spec: hash its parameter document instead of a file.")
def artifact_hash(uri: str | None, spec_path: Path | None) -> None:
    """Print the sha256 a spec should pin for an artifact (file, directory or package:// URI)."""
    from medserve.engines.artifacts import artifact_sha256, resolve_artifact

    if spec_path is not None:
        from medserve.engines.builtin import parameter_sha256
        from medserve.specs import BUILTIN_ENGINES, DeploymentSpec, load_spec

        spec = load_spec(spec_path)
        if not isinstance(spec, DeploymentSpec) or spec.model.engine not in BUILTIN_ENGINES:
            _fail("--spec takes the spec of a built-in engine (hu_roi, noop)")
        click.echo(parameter_sha256(spec))  # type: ignore[arg-type]
        return
    if not uri:
        _fail("give an artifact URI or --spec")
    click.echo(artifact_sha256(resolve_artifact(uri)))  # type: ignore[arg-type]


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
    from medserve.db.models import ApiKey, utcnow

    with session_scope(_settings().resolved_database_url) as session:
        for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            if row.revoked_at:
                state = "revoked"
            elif row.expires_at is not None and row.expires_at <= utcnow():
                state = "expired"
            else:
                state = "active"
            click.echo(f"{row.key_id}  {row.role:<12} {row.department or '-':<14} {state:<8} {row.name}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key now (gateways stop accepting it within MEDSERVE_API_KEY_CACHE_SECONDS, default 5 s)."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import revoke_api_key

    settings = _settings()
    with session_scope(settings.resolved_database_url) as session:
        revoke_api_key(session, key_id)
    click.echo(
        f"key {key_id} revoked; gateways refuse it within {settings.api_key_cache_seconds:g} s (their key cache).",
        err=True,
    )


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace-hours", type=float, default=24.0, show_default=True,
              help="Hours the old key keeps working, to roll the new one out.")
def keys_rotate(key_id: str, grace_hours: float) -> None:
    """Create a replacement key (same name, role, department) and expire the old one after the grace."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import rotate_api_key

    if grace_hours < 0:
        _fail("--grace-hours must not be negative")
    with session_scope(_settings().resolved_database_url) as session:
        row, plaintext = rotate_api_key(session, key_id, grace=timedelta(hours=grace_hours))
        new_id = row.key_id
    click.echo(plaintext)
    click.echo(f"new key id {new_id}; key {key_id} expires in {grace_hours:g} h. Store the new key now.", err=True)


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


@audit.command("verify")
def audit_verify() -> None:
    """Check every hash chain and signed checkpoint; exit 0 and say OK, or name the first bad record."""
    from medserve.audit.integrity import verify

    settings = _settings()
    result = verify(settings.resolved_database_url, settings.audit_signing_key_bytes())
    summary = f"{result.records} records in {result.chains} chain(s), {result.checkpoints} signed checkpoints"
    if result.ok:
        click.echo(f"OK: {summary}")
        return
    for problem in result.problems:
        click.echo(f"FAILED {problem}", err=True)
    _fail(f"audit trail verification FAILED ({len(result.problems)} problem(s); {summary})", code=2)


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["fhir", "jsonl"]), default="fhir", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: standard output).")
@click.option("--since", type=click.DateTime(), default=None, help="Only records at or after this UTC time.")
@click.option("--until", type=click.DateTime(), default=None, help="Only records before this UTC time.")
@click.option("--model", default=None, help="Only records for this model.")
def audit_export(fmt: str, output: Path | None, since: Any, until: Any, model: str | None) -> None:
    """Export audit records, oldest first: a FHIR R4 Bundle of AuditEvents, or JSON lines."""
    from datetime import timezone

    from medserve.audit.fhir import bundle
    from medserve.audit.queries import AuditFilter, search_records

    where = AuditFilter(
        model=model,
        since=since.replace(tzinfo=timezone.utc) if since else None,
        until=until.replace(tzinfo=timezone.utc) if until else None,
    )
    records = search_records(_settings().resolved_database_url, where, limit=10_000_000, oldest_first=True)
    if fmt == "fhir":
        text = json.dumps(bundle(records), indent=1) + "\n"
    else:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {len(records)} audit records to {output}", err=True)


@audit.command("prune")
@click.option("--older-than", "days", type=click.IntRange(min=0), required=True, help="Age in days.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def audit_prune(days: int, yes: bool) -> None:
    """Delete records older than DAYS; a signed anchor keeps the remaining chain verifiable."""
    from medserve.audit.integrity import prune

    if not yes:
        click.confirm(f"Delete audit records older than {days} days?", abort=True)
    settings = _settings()
    deleted = prune(settings.resolved_database_url, settings.audit_signing_key_bytes(), timedelta(days=days))
    click.echo(f"pruned {deleted} audit records older than {days} days")


# --- platform lifecycle ---------------------------------------------------------


def _render_options(settings: Settings):  # type: ignore[no-untyped-def]
    from medserve.controlplane.render import RenderOptions

    return RenderOptions.from_settings(settings)


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
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Connections held open, each sending its next request as soon as it has an answer.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds measured per path and round (after a warm-up).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Rounds; the paths alternate within each, so background load falls on all alike.")
@click.option("--serve-mode", type=click.Choice(["throughput", "default"]), default="throughput", show_default=True,
              help="throughput: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress); default: through Serve's proxy.")
@click.option("--imaging/--no-imaging", default=True, show_default=True, help="Also measure the brain-MRI model.")
@click.option("--llm/--no-llm", default=True, show_default=True, help="Also measure SmolLM2 tokens per second.")
@click.option("--autoscale", is_flag=True, help="Also time a load step's scale-up and the way back down.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replicas of the raw baseline and of the gateway alike (direct ingress: one port each).")
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None,
              help="Catalog holding the imaging and LLM demo specs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON here.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Record raw's and the gateway's replicas with py-spy during the first strict round (collapsed "
                   "stacks here) and print their top frames by self time.")
def bench(concurrency: int, duration_s: float, rounds: int, serve_mode: str, imaging: bool, llm: bool,
          autoscale: bool, replicas: int, deployments_dir: Path | None, json_path: Path | None,
          profile_dir: Path | None) -> None:
    """Load raw Ray Serve and the gateway side by side in a private Ray; print throughput, p50/p95/p99, ratios.

    Starts its own Ray on free ports with its own SQLite (a running medserve is
    not touched) and stops it at the end.
    """
    from medserve.bench.runner import BenchOptions, run_bench

    def _terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)  # unwinds through run_bench's finally, which stops the private Ray

    signal.signal(signal.SIGTERM, _terminate)
    settings = _settings()
    catalog_dir = deployments_dir or settings.deployments_dir
    options = BenchOptions(
        concurrency=concurrency, duration_s=duration_s, rounds=rounds, throughput_optimized=serve_mode == "throughput",
        imaging=imaging, llm=llm, autoscale=autoscale, replicas=replicas, deployments_dir=Path(catalog_dir),
        profile_dir=profile_dir,
    )
    report = run_bench(options, log=lambda line: click.echo(line, err=True))
    click.echo(report.markdown())
    if json_path is not None:
        json_path.write_text(json.dumps(report.__dict__, indent=2))


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
    settings.pseudonym_key_bytes()  # create the keys before replicas race for them
    settings.audit_signing_key_bytes()
    demo_key = _ensure_demo_key(settings)

    ray_address = os.environ.get("RAY_ADDRESS")
    if ray_address:
        dashboard_url, token, started_ray = _remote_dashboard_url(ray_address), os.environ.get("RAY_AUTH_TOKEN"), False
        click.echo(f"Using the Ray cluster at {dashboard_url}")
    else:
        click.echo("Starting a local Ray instance (token auth on, dashboard on loopback)...")
        connection = start_local_ray(settings)
        dashboard_url, token, started_ray = connection.dashboard_url, connection.auth_token, True
    (home / UP_STATE_FILE).write_text(json.dumps({
        "dashboard_url": dashboard_url,
        "started_ray": started_ray,
        "deployments_dir": str((deployments_dir or settings.deployments_dir).resolve()),
        "gateway_url": f"http://{settings.gateway_host}:{settings.gateway_port}",
    }))

    target = RayClusterTarget(dashboard_url, token)
    click.echo(f"Applying {len(specs)} deployment spec(s) to {target.description}...")
    result = apply_catalog(url, specs, target, _render_options(settings),
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
    base = f"http://{settings.gateway_host}:{settings.gateway_port}"
    click.echo("")
    click.echo(f"medserve gateway: {base}  (health: {base}/healthz, models: {base}/v1/models)")
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
        _fail("--target ray needs RAY_ADDRESS (the Ray dashboard URL)")
    return RayClusterTarget(_remote_dashboard_url(ray_address or ""), os.environ.get("RAY_AUTH_TOKEN"))


@cli.command()
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

    settings = _settings()
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
                _render_options(settings),
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


@cli.command()
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
    from medserve.controlplane.local_ray import ray_auth_token
    from medserve.controlplane.targets import RayClusterTarget

    if target != "local":
        source = _target(target, namespace, rayservice)
    else:
        settings = _settings()
        state_path = settings.resolved_home / UP_STATE_FILE
        if not state_path.exists():
            _fail("medserve is not up here (no `medserve up` state found)")
        state = json.loads(state_path.read_text())
        token = ray_auth_token(settings) if state["started_ray"] else os.environ.get("RAY_AUTH_TOKEN")
        source = RayClusterTarget(state["dashboard_url"], token)
        gateway_url = gateway_url or state.get("gateway_url")
    apps = source.application_status()
    if not apps:
        click.echo(f"{source.description}: no Serve application reported yet")
    for name, app in sorted(apps.items()):
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


# --- model registry and rollouts -----------------------------------------------------


def _who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def _controller(settings: Settings):  # type: ignore[no-untyped-def]
    """The rollout controller for the platform `medserve up` started here."""
    from medserve.controlplane.local_ray import ray_auth_token
    from medserve.controlplane.rollouts import RolloutController
    from medserve.controlplane.targets import RayClusterTarget
    from medserve.specs import load_catalog

    state_path = settings.resolved_home / UP_STATE_FILE
    if not state_path.exists():
        _fail("medserve is not up here (no `medserve up` state found): rollouts need the running cluster")
    state = json.loads(state_path.read_text())
    token = ray_auth_token(settings) if state["started_ray"] else os.environ.get("RAY_AUTH_TOKEN")
    specs = load_catalog(Path(state.get("deployments_dir") or settings.deployments_dir))
    return RolloutController(
        settings.resolved_database_url,
        specs,
        RayClusterTarget(state["dashboard_url"], token),
        _render_options(settings),
        require_approved=settings.require_approved_versions,
        cache_seconds=settings.rollout_cache_seconds,
    )


@cli.group()
def models() -> None:
    """The model registry: versions, status gates, aliases, comparisons."""


@models.command("list")
def models_list() -> None:
    """Models with their aliases and any rollout in progress."""
    from medserve.registry.admin import list_models

    for model in list_models(_settings().resolved_database_url):
        aliases = ", ".join(f"{a['name']}={a['version']}" for a in model["aliases"]) or "-"
        rollout = model["rollout"]
        running = f"{rollout['mode']} {rollout['candidate']}" + (
            f" {rollout['percent']:g}%" if rollout["mode"] == "canary" else "") if rollout else "-"
        click.echo(f"{model['name']:<32} {model['task']:<8} versions {model['versions']:<3} {aliases:<32} rollout: {running}")


@models.command("versions")
@click.argument("name")
def models_versions(name: str) -> None:
    """A model's versions: status, digest, who registered and approved them."""
    from medserve.registry.admin import list_versions

    for v in list_versions(_settings().resolved_database_url, name):
        approved = f"approved by {v['approved_by']} at {v['approved_at']}" if v["approved_by"] else ""
        click.echo(f"{v['version']:<20} {v['status']:<10} {v['engine']:<10} {(v['artifact_sha256'] or 'unpinned')[:16]}  "
                   f"registered by {v['registered_by']}  {approved}")


@models.command("register")
@click.option("-f", "--file", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A deployment spec naming the version, its artifact, sha256 and model card.")
@click.option("--by", default=None, help="Who registers it (default: the OS user).")
def models_register(path: Path, by: str | None) -> None:
    """Register the version a spec file names (status: registered). Versions are immutable."""
    from medserve.registry.admin import register_from_spec
    from medserve.specs import load_spec

    row = register_from_spec(_settings().resolved_database_url, load_spec(path), by or _who())
    click.echo(f"{row['model']} {row['version']}: {row['status']}")


def _status_command(name: str, new: str, help_text: str):  # type: ignore[no-untyped-def]
    @models.command(name, help=help_text)
    @click.argument("model")
    @click.argument("version")
    @click.option("--by", default=None, help="Who takes this decision (recorded; default: the OS user).")
    def command(model: str, version: str, by: str | None) -> None:
        from medserve.registry.admin import change_status

        row = change_status(_settings().resolved_database_url, model, version, new, by or _who())
        click.echo(f"{model} {version}: {row['status']} (by {row['status_changed_by']})")

    return command


_status_command("validate", "validated", "Mark a version validated (evidence reviewed; may run as a shadow).")
_status_command("approve", "approved", "Approve a validated version for clinical traffic (records who and when).")
_status_command("retire", "retired", "Retire a version; it never takes traffic again.")


@models.command("alias")
@click.argument("model")
@click.argument("alias")
@click.argument("version")
def models_alias(model: str, alias: str, version: str) -> None:
    """Point an alias (e.g. staging) at a version. Use `promote` for the alias a deployment serves."""
    from medserve.registry.admin import point_alias

    point_alias(_settings().resolved_database_url, model, alias, version, _who())
    click.echo(f"{model}: {alias} -> {version}")


@models.command("history")
@click.argument("model")
def models_history(model: str) -> None:
    """Who registered, validated, approved, rolled out, promoted and rolled back what, and when."""
    from medserve.registry.admin import model_history

    for event in model_history(_settings().resolved_database_url, model):
        details = " ".join(f"{k}={v}" for k, v in event["details"].items())
        click.echo(f"{event['at']}  {event['action']:<10} {event['version'] or '-':<20} {event['actor']}  {details}")


@models.command("compare")
@click.argument("model")
@click.option("--since-minutes", type=float, default=None, help="Only records this recent (default: the current "
              "rollout's start, else everything).")
def models_compare(model: str, since_minutes: float | None) -> None:
    """Compare the versions of a canary or shadow from the audit trail (JSON)."""
    from medserve.registry.admin import comparison_report

    click.echo(json.dumps(comparison_report(_settings().resolved_database_url, model, since_minutes), indent=2))


@cli.command()
@click.argument("model")
@click.option("--canary", "canary_version", default=None, help="Send a share of traffic to this version.")
@click.option("--percent", type=float, default=None, help="Canary share, 0-100 (sticky per patient).")
@click.option("--shadow", "shadow_version", default=None, help="Mirror traffic to this version; never returned.")
def rollout(model: str, canary_version: str | None, percent: float | None, shadow_version: str | None) -> None:
    """Start a canary or shadow rollout of a version (deploys it first; refuses on a failed gate)."""
    if (canary_version is None) == (shadow_version is None):
        _fail("give exactly one of --canary VERSION --percent P, or --shadow VERSION")
    settings = _settings()
    controller = _controller(settings)
    if canary_version is not None:
        if percent is None:
            _fail("--canary needs --percent")
        controller.canary(model, canary_version, percent, _who())
        click.echo(f"{model}: canary {canary_version} at {percent:g}% (sticky per patient)")
    else:
        controller.shadow(model, shadow_version, _who())
        click.echo(f"{model}: shadow {shadow_version} (answers audited, never returned)")


@cli.command()
@click.argument("model")
@click.argument("version")
def promote(model: str, version: str) -> None:
    """Make a version the one the model's deployment serves; ends any rollout."""
    _controller(_settings()).promote(model, version, _who())
    click.echo(f"{model}: {version} promoted")


@cli.command()
@click.argument("model")
def rollback(model: str) -> None:
    """End the rollout in progress, or move back to the previous version."""
    result = _controller(_settings()).rollback(model, _who())
    what = "rollout ended" if result.action == "rollout_ended" else "reverted"
    click.echo(f"{model}: {what}; {result.version} answers all requests")


@cli.command("apply")
def apply_command() -> None:
    """Re-apply the catalog and the registry's rollouts to the running cluster."""
    result = _controller(_settings()).apply()
    for name, versions in sorted(result.versions.items()):
        click.echo(f"  serving  {name}: {', '.join(versions)}")
    for line in result.refused:
        click.echo(f"  refused  {line}")


# --- on-prem nodes without Kubernetes ---------------------------------------------------


@cli.group()
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
        join_token, parse_join, parse_resources, shell_command, start_node, stop_node,
    )

    join = parse_join(address=address, resources=parse_resources(resources_json), num_cpus=num_cpus,
                      num_gpus=num_gpus, node_ip_address=node_ip_address)
    if print_only:
        click.echo(shell_command(join, token_file))
        return
    settings = _settings()
    token = join_token(settings, token_file)
    if not os.environ.get("MEDSERVE_DATABASE_URL"):
        click.echo("warning: MEDSERVE_DATABASE_URL is not set: replicas placed here that write audit records would "
                   "use a SQLite file on this machine, not the head's database", err=True)
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
        _fail(f"the node stopped on its own (exit {node.process.returncode}); see {log_path}")
    stop_node(node)
    click.echo("node stopped.")


@cluster.command("nodes")
@click.option("--dashboard", "dashboard_url", default=None,
              help="Ray dashboard URL (default: the Ray `medserve up` uses here, else RAY_ADDRESS).")
def cluster_nodes(dashboard_url: str | None) -> None:
    """List the cluster's nodes: id, address, alive, resources."""
    from medserve.controlplane.cluster import list_nodes
    from medserve.controlplane.local_ray import ray_auth_token

    settings = _settings()
    state_path = settings.resolved_home / UP_STATE_FILE
    token = os.environ.get("RAY_AUTH_TOKEN")
    if dashboard_url is None and state_path.exists():
        state = json.loads(state_path.read_text())
        dashboard_url = state["dashboard_url"]
        token = ray_auth_token(settings) if state["started_ray"] else token
    elif dashboard_url is None and os.environ.get("RAY_ADDRESS"):
        dashboard_url = _remote_dashboard_url(os.environ["RAY_ADDRESS"])
    if dashboard_url is None:
        _fail("no Ray cluster known here: run on the head after `medserve up`, or give --dashboard or RAY_ADDRESS")
    for node in list_nodes(dashboard_url or "", token):
        role = "head" if node.is_head else "worker"
        resources = ", ".join(f"{name}={amount:g}" for name, amount in sorted(node.resources.items())
                              if not name.startswith("node:"))
        click.echo(f"{node.node_id}  {node.address:<15} {role:<6} {'alive' if node.alive else 'dead':<5}  {resources}")


if __name__ == "__main__":
    main()

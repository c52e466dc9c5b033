"""`medserve audit`: list, verify, export and prune the audit trail."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from medserve.cli.common import fail, load_settings


@click.group()
def audit() -> None:
    """The audit trail."""


@audit.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--model", default=None, help="Only records for this model.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_list(limit: int, model: str | None, as_json: bool) -> None:
    """Newest audit records first."""
    from medserve.audit.queries import list_records

    for record in list_records(load_settings().resolved_database_url, limit=limit, model=model):
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

    settings = load_settings()
    result = verify(settings.resolved_database_url, settings.audit_signing_key_bytes())
    summary = f"{result.records} records in {result.chains} chain(s), {result.checkpoints} signed checkpoints"
    if result.ok:
        click.echo(f"OK: {summary}")
        return
    for problem in result.problems:
        click.echo(f"FAILED {problem}", err=True)
    fail(f"audit trail verification FAILED ({len(result.problems)} problem(s); {summary})", code=2)


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
    records = search_records(load_settings().resolved_database_url, where, limit=10_000_000, oldest_first=True)
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
    settings = load_settings()
    deleted = prune(settings.resolved_database_url, settings.audit_signing_key_bytes(), timedelta(days=days))
    click.echo(f"pruned {deleted} audit records older than {days} days")

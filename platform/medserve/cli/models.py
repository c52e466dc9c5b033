"""`medserve models`: the model registry (versions, status gates, aliases, history, comparisons)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medserve.cli.common import load_settings, who


@click.group()
def models() -> None:
    """The model registry: versions, status gates, aliases, comparisons."""


@models.command("list")
def models_list() -> None:
    """Models with their aliases and any rollout in progress."""
    from medserve.registry.admin import list_models

    for model in list_models(load_settings().resolved_database_url):
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

    for v in list_versions(load_settings().resolved_database_url, name):
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

    row = register_from_spec(load_settings().resolved_database_url, load_spec(path), by or who())
    click.echo(f"{row['model']} {row['version']}: {row['status']}")


def _status_command(name: str, new: str, help_text: str):  # type: ignore[no-untyped-def]
    @models.command(name, help=help_text)
    @click.argument("model")
    @click.argument("version")
    @click.option("--by", default=None, help="Who takes this decision (recorded; default: the OS user).")
    def command(model: str, version: str, by: str | None) -> None:
        from medserve.registry.admin import change_status

        row = change_status(load_settings().resolved_database_url, model, version, new, by or who())
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

    point_alias(load_settings().resolved_database_url, model, alias, version, who())
    click.echo(f"{model}: {alias} -> {version}")


@models.command("history")
@click.argument("model")
def models_history(model: str) -> None:
    """Who registered, validated, approved, rolled out, promoted and rolled back what, and when."""
    from medserve.registry.admin import model_history

    for event in model_history(load_settings().resolved_database_url, model):
        details = " ".join(f"{k}={v}" for k, v in event["details"].items())
        click.echo(f"{event['at']}  {event['action']:<10} {event['version'] or '-':<20} {event['actor']}  {details}")


@models.command("compare")
@click.argument("model")
@click.option("--since-minutes", type=float, default=None, help="Only records this recent (default: the current "
              "rollout's start, else everything).")
def models_compare(model: str, since_minutes: float | None) -> None:
    """Compare the versions of a canary or shadow from the audit trail (JSON)."""
    from medserve.registry.admin import comparison_report

    click.echo(json.dumps(comparison_report(load_settings().resolved_database_url, model, since_minutes), indent=2))

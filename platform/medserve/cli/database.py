"""`medserve db`: the registry and audit database's schema."""

from __future__ import annotations

import click

from medserve.cli.common import load_settings


@click.group()
def db() -> None:
    """The registry and audit database."""


@db.command()
def upgrade() -> None:
    """Apply all migrations (run before starting a new release)."""
    from medserve.db.engine import current_revision, upgrade as run_upgrade

    url = load_settings().resolved_database_url
    run_upgrade(url)
    click.echo(f"database at revision {current_revision(url)}")

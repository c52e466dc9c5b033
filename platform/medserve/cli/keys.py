"""`medserve keys`: API keys for applications and people. Key state lives in medserve.security.api_keys."""

from __future__ import annotations

from datetime import timedelta

import click

from medserve.cli.common import fail, load_settings
from medserve.security.roles import Role


@click.group()
def keys() -> None:
    """API keys for applications and people."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", required=True, type=click.Choice([role.value for role in Role]))
@click.option("--department", default=None, help="Bind the key to one department.")
@click.option("--expires-in-days", type=int, default=None, help="Expire the key after this many days.")
def keys_create(name: str, role: str, department: str | None, expires_in_days: int | None) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from medserve.db.engine import session_scope
    from medserve.db.models import utcnow
    from medserve.security.api_keys import create_api_key

    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with session_scope(load_settings().resolved_database_url) as session:
        row, plaintext = create_api_key(session, name=name, role=role, department=department, expires_at=expires)
        key_id = row.key_id
    click.echo(plaintext)
    click.echo(f"key id {key_id} ({role}); store it now: it cannot be shown again.", err=True)


@keys.command("list")
def keys_list() -> None:
    """List keys (ids, names, roles; never secrets)."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import list_api_keys

    with session_scope(load_settings().resolved_database_url) as session:
        listed = list_api_keys(session)
    for key in listed:
        click.echo(f"{key.key_id}  {key.role.value:<12} {key.department or '-':<14} {key.state:<8} {key.name}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key now (gateways stop accepting it within MEDSERVE_API_KEY_CACHE_SECONDS, default 5 s)."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import revoke_api_key

    settings = load_settings()
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
        fail("--grace-hours must not be negative")
    with session_scope(load_settings().resolved_database_url) as session:
        row, plaintext = rotate_api_key(session, key_id, grace=timedelta(hours=grace_hours))
        new_id = row.key_id
    click.echo(plaintext)
    click.echo(f"new key id {new_id}; key {key_id} expires in {grace_hours:g} h. Store the new key now.", err=True)

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
@click.option("--rate-limit-rps", type=float, default=None,
              help="This key's own requests per second (default: MEDSERVE_RATE_LIMIT_KEY_RPS; 0: no limit).")
def keys_create(name: str, role: str, department: str | None, expires_in_days: int | None,
                rate_limit_rps: float | None) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from medserve.db.engine import session_scope
    from medserve.db.models import utcnow
    from medserve.security.api_keys import create_api_key

    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with session_scope(load_settings().resolved_database_url) as session:
        row, plaintext = create_api_key(session, name=name, role=role, department=department, expires_at=expires,
                                        rate_limit_rps=rate_limit_rps)
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


def _rate_limit_line(own: float | None) -> str:
    settings = load_settings()
    if own == 0:
        return "no limit (this key's own setting)"
    if own is not None:
        return f"{own:g} requests/s, burst {settings.rate_limit_burst_seconds:g} s (this key's own setting)"
    if not settings.rate_limit_key_rps:
        return "no limit (the install sets no default: MEDSERVE_RATE_LIMIT_KEY_RPS=0)"
    return (f"{settings.rate_limit_key_rps:g} requests/s, burst {settings.rate_limit_burst_seconds:g} s "
            "(the install's default, MEDSERVE_RATE_LIMIT_KEY_RPS)")


@keys.command("show")
@click.argument("key_id")
def keys_show(key_id: str) -> None:
    """Show one key: role, department, state and the request rate it is held to (never its secret)."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import show_api_key

    with session_scope(load_settings().resolved_database_url) as session:
        key = show_api_key(session, key_id)
    click.echo(f"key id:      {key.key_id}")
    click.echo(f"name:        {key.name}")
    click.echo(f"role:        {key.role.value}")
    click.echo(f"department:  {key.department or '-'}")
    click.echo(f"state:       {key.state}")
    click.echo(f"created:     {key.created_at.isoformat()}")
    click.echo(f"expires:     {key.expires_at.isoformat() if key.expires_at else '-'}")
    click.echo(f"rate limit:  {_rate_limit_line(key.rate_limit_rps)}")


@keys.command("set-rate-limit")
@click.argument("key_id")
@click.argument("rps")
def keys_set_rate_limit(key_id: str, rps: str) -> None:
    """Give a key its own requests per second: a number, 0 for no limit, or 'default' for the install's default."""
    from medserve.db.engine import session_scope
    from medserve.security.api_keys import set_key_rate_limit

    try:
        value = None if rps == "default" else float(rps)
    except ValueError:
        fail(f"RPS is a number of requests per second, 0 (no limit) or 'default', not {rps!r}")
    settings = load_settings()
    with session_scope(settings.resolved_database_url) as session:
        set_key_rate_limit(session, key_id, value)
    click.echo(f"key {key_id}: {_rate_limit_line(value)}; gateways apply it within "
               f"{settings.api_key_cache_seconds:g} s (their key refresh).", err=True)


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

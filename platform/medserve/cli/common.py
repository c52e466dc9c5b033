"""What every room of the CLI shares: settings, failing, the state `medserve up` leaves, who is acting."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from medserve.settings import Settings

UP_STATE_FILE = "up.json"
DEMO_KEY_FILE = "demo-api-key"


def load_settings() -> Settings:
    return Settings()


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def who() -> str:
    """The OS user, recorded as the actor of registry decisions."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def render_options(current: Settings):  # type: ignore[no-untyped-def]
    from medserve.controlplane.render import RenderOptions

    return RenderOptions.from_settings(current)


def remote_dashboard_url(ray_address: str) -> str:
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    host = ray_address.removeprefix("ray://").split(":")[0]
    return f"http://{host}:8265"


def up_state(current: Settings) -> dict[str, Any] | None:
    """What `medserve up` recorded here (dashboard, whether it started Ray, ...), or None when it is not up."""
    path = current.resolved_home / UP_STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def ray_token(current: Settings, state: dict[str, Any]) -> str | None:
    """The Ray auth token for the cluster an up state names: ours if `up` started Ray, else RAY_AUTH_TOKEN."""
    from medserve.controlplane.local_ray import ray_auth_token

    return ray_auth_token(current) if state["started_ray"] else os.environ.get("RAY_AUTH_TOKEN")

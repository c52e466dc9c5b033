"""Rollouts on the running platform: `rollout`, `promote`, `rollback`, `apply`."""

from __future__ import annotations

from pathlib import Path

import click

from medserve.cli.common import fail, load_settings, ray_token, render_options, up_state, who
from medserve.settings import Settings


def _controller(settings: Settings):  # type: ignore[no-untyped-def]
    """The rollout controller for the platform `medserve up` started here."""
    from medserve.controlplane.rollouts import RolloutController
    from medserve.controlplane.targets import RayClusterTarget
    from medserve.specs import load_catalog

    state = up_state(settings)
    if state is None:
        fail("medserve is not up here (no `medserve up` state found): rollouts need the running cluster")
    token = ray_token(settings, state)
    specs = load_catalog(Path(state.get("deployments_dir") or settings.deployments_dir))
    return RolloutController(
        settings.resolved_database_url,
        specs,
        RayClusterTarget(state["dashboard_url"], token),
        render_options(settings),
        require_approved=settings.require_approved_versions,
        cache_seconds=settings.rollout_cache_seconds,
    )


@click.command()
@click.argument("model")
@click.option("--canary", "canary_version", default=None, help="Send a share of traffic to this version.")
@click.option("--percent", type=float, default=None, help="Canary share, 0-100 (sticky per patient).")
@click.option("--shadow", "shadow_version", default=None, help="Mirror traffic to this version; never returned.")
def rollout(model: str, canary_version: str | None, percent: float | None, shadow_version: str | None) -> None:
    """Start a canary or shadow rollout of a version (deploys it first; refuses on a failed gate)."""
    if (canary_version is None) == (shadow_version is None):
        fail("give exactly one of --canary VERSION --percent P, or --shadow VERSION")
    settings = load_settings()
    controller = _controller(settings)
    if canary_version is not None:
        if percent is None:
            fail("--canary needs --percent")
        controller.canary(model, canary_version, percent, who())
        click.echo(f"{model}: canary {canary_version} at {percent:g}% (sticky per patient)")
    else:
        controller.shadow(model, shadow_version, who())
        click.echo(f"{model}: shadow {shadow_version} (answers audited, never returned)")


@click.command()
@click.argument("model")
@click.argument("version")
def promote(model: str, version: str) -> None:
    """Make a version the one the model's deployment serves; ends any rollout."""
    _controller(load_settings()).promote(model, version, who())
    click.echo(f"{model}: {version} promoted")


@click.command()
@click.argument("model")
def rollback(model: str) -> None:
    """End the rollout in progress, or move back to the previous version."""
    result = _controller(load_settings()).rollback(model, who())
    what = "rollout ended" if result.action == "rollout_ended" else "reverted"
    click.echo(f"{model}: {what}; {result.version} answers all requests")


@click.command("apply")
def apply_command() -> None:
    """Re-apply the catalog and the registry's rollouts to the running cluster."""
    result = _controller(load_settings()).apply()
    for name, versions in sorted(result.versions.items()):
        click.echo(f"  serving  {name}: {', '.join(versions)}")
    for line in result.refused:
        click.echo(f"  refused  {line}")

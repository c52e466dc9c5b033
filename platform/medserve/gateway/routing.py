"""The gateway's view of aliases and rollouts: read from the registry, cached briefly.

Why the database and not the Serve config: a rollout change written to the
registry reaches every gateway replica within ``rollout_cache_seconds``
without redeploying anything, so a rollback takes about a second and cannot
drop a request. Putting the rollout into the gateway's application args
would instead redeploy the gateway replica on every switch. The control
plane deploys a version's application before the registry points traffic
at it; as a second guard (a rollout started through the admin API, whose
candidate the control plane has not deployed yet, or a candidate whose
application failed), the gateway sends a candidate traffic only while Serve
reports its application RUNNING.
The table is a last-known-good copy (gateway/known_state.py): reloaded in
the background, never on a request's path, and kept when a reload fails, so
a database outage leaves routing as it was.
"""

from __future__ import annotations

import dataclasses
import logging

from medserve.catalog import Catalog, CatalogEntry
from medserve.db.engine import session_scope
from medserve.gateway.known_state import KnownState
from medserve.registry.lifecycle import route_states
from medserve.registry.routing import RouteState, VersionRef

logger = logging.getLogger("medserve.gateway.routing")


class RouteTable:
    def __init__(self, database_url: str, catalog: Catalog, cache_seconds: float) -> None:
        self._database_url = database_url
        self._follows = {e.model_name: (e.deployment, e.alias) for e in catalog.entries() if e.alias is not None}
        self.known: KnownState[dict[str, RouteState]] = KnownState("routes", self._load, cache_seconds)

    def _load(self) -> dict[str, RouteState]:
        if not self._follows:
            return {}
        with session_scope(self._database_url) as session:
            states = route_states(session, self._follows)
        if all(state.candidate is None for state in states.values()):
            # No rollout: nothing to filter, and asking the Serve controller
            # (a round trip on every refresh) would only slow requests down.
            return states
        running = _running_apps()
        if running is None:
            return states
        return {
            name: state if state.candidate is None or state.candidate.app_name in running
            else dataclasses.replace(state, mode=None, candidate=None)
            for name, state in states.items()
        }

    async def states(self) -> dict[str, RouteState]:
        if not self._follows:
            return {}
        return await self.known.get()

    async def state(self, model_name: str) -> RouteState | None:
        return (await self.states()).get(model_name)


def _running_apps() -> set[str] | None:
    """Serve applications that are RUNNING, or None if Serve cannot be asked (then no filtering)."""
    try:
        from ray import serve

        return {name for name, app in serve.status().applications.items() if app.status == "RUNNING"}
    except Exception as error:  # noqa: BLE001
        logger.warning("could not read Serve application status: %s", type(error).__name__)
        return None


def entry_for(entry: CatalogEntry, version: VersionRef) -> CatalogEntry:
    """The catalog entry of a model, pointed at one deployed version."""
    return entry.model_copy(
        update={"model_version": version.version, "artifact_sha256": version.artifact_sha256, "app_name": version.app_name}
    )

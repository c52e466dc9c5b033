"""Canary, shadow, promote and rollback as ordered steps that never drop a request.

Order is what makes a switch safe:

- **start** (canary or shadow): check the gates (status, then the artifact's
  sha256 where the artifact is reachable from here), deploy the candidate's own
  application beside the running ones and wait until it runs, and only then
  write the rollout to the registry. A candidate that fails any step is
  refused and the registry is untouched: the current version keeps serving.
- **promote**: make sure the version runs, move the alias (gateways follow
  within ``rollout_cache_seconds``), then re-apply; the old version stays
  deployed as the rollback target.
- **rollback**: one registry write (gateways follow within the cache window),
  then, after that window, re-apply so an ended candidate's application is
  removed once no gateway routes to it.

The gateway's application args never change in any of these, so Serve never
redeploys the gateway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from medserve.controlplane.reconcile import ApplyResult, apply_catalog, check_artifact_locally
from medserve.controlplane.render import RenderOptions
from medserve.controlplane.targets import ServeTarget
from medserve.db.engine import session_scope
from medserve.errors import RolloutError
from medserve.registry import lifecycle
from medserve.registry.lifecycle import RollbackResult
from medserve.registry.routing import CANARY, SHADOW
from medserve.specs import DeploymentSpec, deployments_of


@dataclass
class RolloutController:
    database_url: str
    specs: list[DeploymentSpec]
    target: ServeTarget
    options: RenderOptions
    require_approved: bool = True
    cache_seconds: float = 1.0
    wait_timeout_s: float = 600.0

    def _deployment(self, model_name: str) -> DeploymentSpec:
        for spec in deployments_of(self.specs):  # the catalog holds pipeline specs too
            if spec.model.name == model_name:
                if spec.alias is None:
                    raise RolloutError("the deployment pins model.version (alias: null); no rollouts", model=model_name)
                return spec
        raise RolloutError("no deployment in the catalog serves this model", model=model_name)

    def apply(self, extra: dict[str, list[str]] | None = None) -> ApplyResult:
        return apply_catalog(
            self.database_url, self.specs, self.target, self.options, registered_by="control plane",
            wait_timeout_s=self.wait_timeout_s, require_approved=self.require_approved, extra_versions=extra,
        )

    def _preflight(self, model_name: str, version: str) -> None:
        """The candidate's artifact must hash to its pin before anything is deployed."""
        with session_scope(self.database_url) as session:
            row = lifecycle.get_version(session, model_name, version)
            if row.spec is None:
                raise RolloutError("the version was registered without a spec; register it with -f",
                                   model=model_name, version=version)
            spec = DeploymentSpec.model_validate(row.spec)
        check_artifact_locally(spec)

    def _dry_run_start(self, model_name: str, mode: str, version: str, percent: float, alias: str) -> None:
        with session_scope(self.database_url) as session:
            lifecycle.start_rollout(session, model_name, mode, version, "dry run", percent=percent, alias=alias,
                                    require_approved=self.require_approved)
            session.rollback()

    def start(self, model_name: str, mode: str, version: str, by: str, *, percent: float = 0.0) -> ApplyResult | None:
        alias = self._deployment(model_name).alias
        assert alias is not None
        self._dry_run_start(model_name, mode, version, percent, alias)
        self._preflight(model_name, version)
        result = self.apply({model_name: [version]})
        with session_scope(self.database_url) as session:
            lifecycle.start_rollout(session, model_name, mode, version, by, percent=percent, alias=alias,
                                    require_approved=self.require_approved)
        return result

    def canary(self, model_name: str, version: str, percent: float, by: str) -> ApplyResult | None:
        return self.start(model_name, CANARY, version, by, percent=percent)

    def shadow(self, model_name: str, version: str, by: str) -> ApplyResult | None:
        return self.start(model_name, SHADOW, version, by)

    def promote(self, model_name: str, version: str, by: str) -> ApplyResult:
        alias = self._deployment(model_name).alias
        assert alias is not None
        with session_scope(self.database_url) as session:
            target = lifecycle.get_version(session, model_name, version)
            lifecycle.require_clinical(target, model_name, require_approved=self.require_approved)
        self._preflight(model_name, version)
        self.apply({model_name: [version]})
        with session_scope(self.database_url) as session:
            lifecycle.promote(session, model_name, version, by, alias=alias, require_approved=self.require_approved)
        self._settle()
        return self.apply()

    def rollback(self, model_name: str, by: str, *, tidy: bool = True) -> RollbackResult:
        alias = self._deployment(model_name).alias
        assert alias is not None
        with session_scope(self.database_url) as session:
            result = lifecycle.rollback(session, model_name, by, alias=alias)
        if tidy:
            self._settle()
            self.apply()
        return result

    def _settle(self) -> None:
        # Every gateway replica has re-read the registry after this long, so
        # no request is routed to an application the next apply removes.
        time.sleep(self.cache_seconds + 1.0)

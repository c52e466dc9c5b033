"""Apply the catalog: decide what can run, record it, render, apply, wait.

A spec whose replica cannot fit on any node (no GPU, no node with its custom
resource) or whose engine is not installed is skipped with a reason rather
than left pending forever; the rest of the catalog still deploys.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from medserve.controlplane.render import COMPLIANCE_APP, GATEWAY_APP, RenderOptions, render_serve_config
from medserve.controlplane.targets import ServeTarget
from medserve.db.engine import session_scope
from medserve.engines.artifacts import artifact_sha256, resolve_artifact
from medserve.engines.loader import engine_available
from medserve.errors import ArtifactError, ArtifactIntegrityError
from medserve.registry.lifecycle import active_versions, ensure_alias, get_version
from medserve.registry.routing import version_app_name
from medserve.registry.service import mark_removed, record_deployment, register_version
from medserve.specs import DeploymentSpec, PipelineSpec, deployments_of, pipelines_of

logger = logging.getLogger("medserve.controlplane")


@dataclass(frozen=True)
class PlanItem:
    spec: DeploymentSpec
    deploy: bool
    reason: str | None = None


def replica_needs(spec: DeploymentSpec) -> dict[str, float]:
    needs = {"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus, **spec.resources.custom}
    if spec.resources.accelerator_type:
        needs[f"accelerator_type:{spec.resources.accelerator_type}"] = 0.001
    return {name: amount for name, amount in needs.items() if amount > 0}


def capacity_problem(spec: DeploymentSpec, nodes: list[dict[str, float]]) -> str | None:
    """Why no node can host one replica of the spec, or None when some node can."""
    needs = replica_needs(spec)
    if any(all(node.get(name, 0.0) >= amount for name, amount in needs.items()) for node in nodes):
        return None
    missing = []
    for name, amount in needs.items():
        best = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if best >= amount:
            continue
        if name.startswith("accelerator_type:"):
            missing.append(f"no node has an accelerator of type {name.removeprefix('accelerator_type:')}")
        else:
            missing.append(f"{name}: needs {amount:g} per replica, largest node has {best:g}")
    return "the cluster lacks resources (" + "; ".join(missing or ["no single node has all of them"]) + ")"


def plan(
    specs: list[DeploymentSpec | PipelineSpec], nodes: list[dict[str, float]], *, check_engines: bool = True,
    gateway_num_cpus: float = 0.0,
) -> list[PlanItem]:
    """One item per model deployment (pipelines need no capacity of their own).

    Engines placed in the gateway add their CPUs to the gateway's replica; one
    that would make that replica too large for every node is skipped, since a
    gateway Ray cannot place would take every model down with it.
    """
    items = []
    gateway_cpus = gateway_num_cpus
    largest_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    for spec in deployments_of(specs):
        reason = capacity_problem(spec, nodes)
        if reason is None and spec.placement == "gateway":
            if gateway_cpus + spec.resources.num_cpus > largest_cpus:
                reason = (f"placement gateway: the gateway's replica would need "
                          f"{gateway_cpus + spec.resources.num_cpus:g} CPUs, the largest node has {largest_cpus:g}")
            else:
                gateway_cpus += spec.resources.num_cpus
        if reason is None and check_engines:
            available, reason = engine_available(spec.model.engine)
        items.append(PlanItem(spec, deploy=reason is None, reason=reason))
    return items


@dataclass(frozen=True)
class ApplyResult:
    plan: list[PlanItem]
    config: dict[str, Any]
    statuses: dict[str, dict[str, Any]]
    # deployment name -> versions it runs (alias version first)
    versions: dict[str, list[str]] = field(default_factory=dict)
    # "<model> <version>: why" for versions left out (integrity, status)
    refused: list[str] = field(default_factory=list)


def check_artifact_locally(spec: DeploymentSpec) -> None:
    """Refuse a version whose artifact, reachable from here, does not hash to its pin.

    Engines check again when they load (the node may differ); this check
    refuses before anything is deployed, so the running version keeps
    serving untouched. An artifact not present here is left to the engine.
    """
    artifact = spec.model.artifact
    try:
        path = resolve_artifact(artifact.uri)
    except ArtifactError:
        return
    if artifact.sha256 is None:
        return
    stat = path.stat()
    actual = _local_digest(str(path), stat.st_size, stat.st_mtime_ns)
    if actual != artifact.sha256:
        raise ArtifactIntegrityError(uri=artifact.uri, expected=artifact.sha256, actual=actual)


@lru_cache(maxsize=64)
def _local_digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime: several versions often share one artifact file.
    return artifact_sha256(Path(path))


def _version_specs(
    session: Any,
    spec: DeploymentSpec,
    version: Any,
    extra: list[str],
    *,
    require_approved: bool,
    refused: list[str],
) -> tuple[list[DeploymentSpec], str | None]:
    """The version specs a deployment runs, or a reason it cannot run at all."""
    if spec.alias is None:
        if require_approved and version.status != "approved":
            return [], f"version {spec.model.version} is {version.status}, not approved"
        return [spec], None
    model = version.model
    ensure_alias(session, model, spec.alias, version, "control plane")
    rows = active_versions(session, model.name, spec.alias)
    rows += [get_version(session, model.name, name) for name in extra if name not in {r.version for r in rows}]
    primary = rows[0]
    if require_approved and primary.status != "approved":
        return [], f"{spec.alias} version {primary.version} is {primary.status}, not approved"
    result = []
    for row in rows:
        if row.spec is None:
            refused.append(f"{model.name} {row.version}: registered without a spec; register it with -f")
            continue
        candidate = DeploymentSpec.model_validate(row.spec)
        if candidate.model.artifact.sha256 != row.artifact_sha256:
            refused.append(f"{model.name} {row.version}: stored spec disagrees with the registered digest")
            continue
        try:
            check_artifact_locally(candidate)
        except ArtifactIntegrityError as error:
            if row is primary:
                return [], f"version {row.version}: {error.message}"
            refused.append(f"{model.name} {row.version}: {error.message}")
            continue
        result.append(candidate)
    return result, None


def apply_catalog(
    database_url: str,
    specs: list[DeploymentSpec | PipelineSpec],
    target: ServeTarget,
    options: RenderOptions,
    *,
    registered_by: str = "medserve up",
    check_engines: bool = True,
    wait_timeout_s: float = 600.0,
    require_approved: bool = True,
    extra_versions: dict[str, list[str]] | None = None,
) -> ApplyResult:
    """Record the catalog, decide which versions each deployment runs, render, apply, wait.

    ``extra_versions`` (model name -> versions) deploys versions beside the
    registry's active ones, so a rollout can start only once its candidate runs.
    """
    pipelines = pipelines_of(specs)
    specs = deployments_of(specs)
    items = plan(specs, target.node_resources(), check_engines=check_engines,
                 gateway_num_cpus=options.gateway_num_cpus)
    versions: dict[str, list[DeploymentSpec]] = {}
    refused: list[str] = []
    final: list[PlanItem] = []
    with session_scope(database_url) as session:
        for item in items:
            version = register_version(session, item.spec, registered_by)
            reason = item.reason
            if item.deploy:
                extra = (extra_versions or {}).get(item.spec.model.name, [])
                chosen, reason = _version_specs(
                    session, item.spec, version, extra, require_approved=require_approved, refused=refused
                )
                if reason is None:
                    versions[item.spec.name] = chosen
            item = PlanItem(item.spec, deploy=reason is None, reason=reason)
            final.append(item)
            record_deployment(session, item.spec, version, "applied" if item.deploy else "skipped", item.reason)
        mark_removed(session, {spec.name for spec in specs})
    for line in refused:
        logger.warning("version not deployed: %s", line)
    deployable = [item.spec for item in final if item.deploy]
    # Pipelines always render: a step whose model was skipped is reported as
    # failed (model_unavailable) in each report rather than hiding the pipeline.
    config = render_serve_config([*deployable, *pipelines], options, versions)
    target.apply(config)
    apps = [
        version_app_name(spec.name, v.model.version)
        for spec in deployable if spec.placement == "replicas"
        for v in versions[spec.name]
    ]
    platform_apps = [app["name"] for app in config["applications"] if app["name"] in (GATEWAY_APP, COMPLIANCE_APP)]
    statuses = target.wait_until_running(platform_apps + apps, timeout_s=wait_timeout_s)
    return ApplyResult(
        plan=final,
        config=config,
        statuses=statuses,
        versions={name: [v.model.version for v in specs_] for name, specs_ in versions.items()},
        refused=refused,
    )

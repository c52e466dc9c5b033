"""Apply the catalog: decide what can run, record it, render, apply, wait.

A spec whose replica cannot fit on any node (no GPU, no node with its custom
resource) or whose engine is not installed is skipped with a reason rather
than left pending forever; the rest of the catalog still deploys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medserve.controlplane.render import GATEWAY_APP, RenderOptions, app_name_for, render_serve_config
from medserve.controlplane.targets import ServeTarget
from medserve.db.engine import session_scope
from medserve.engines.loader import engine_available
from medserve.registry.service import mark_removed, record_deployment, register_version
from medserve.specs import DeploymentSpec, PipelineSpec, deployments_of, pipelines_of


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
            missing.append(f"no node has a {name.removeprefix('accelerator_type:')} accelerator")
        else:
            missing.append(f"{name}: needs {amount:g} per replica, largest node has {best:g}")
    return "the cluster lacks resources (" + "; ".join(missing or ["no single node has all of them"]) + ")"


def plan(
    specs: list[DeploymentSpec | PipelineSpec], nodes: list[dict[str, float]], *, check_engines: bool = True
) -> list[PlanItem]:
    """One item per model deployment (pipelines need no capacity of their own)."""
    items = []
    for spec in deployments_of(specs):
        reason = capacity_problem(spec, nodes)
        if reason is None and check_engines:
            available, reason = engine_available(spec.model.engine)
        items.append(PlanItem(spec, deploy=reason is None, reason=reason))
    return items


@dataclass(frozen=True)
class ApplyResult:
    plan: list[PlanItem]
    config: dict[str, Any]
    statuses: dict[str, dict[str, Any]]


def apply_catalog(
    database_url: str,
    specs: list[DeploymentSpec | PipelineSpec],
    target: ServeTarget,
    options: RenderOptions,
    *,
    registered_by: str = "medserve up",
    check_engines: bool = True,
    wait_timeout_s: float = 600.0,
) -> ApplyResult:
    pipelines = pipelines_of(specs)
    specs = deployments_of(specs)
    items = plan(specs, target.node_resources(), check_engines=check_engines)
    deployable = [item.spec for item in items if item.deploy]
    with session_scope(database_url) as session:
        for item in items:
            version = register_version(session, item.spec, registered_by)
            record_deployment(session, item.spec, version, "applied" if item.deploy else "skipped", item.reason)
        mark_removed(session, {spec.name for spec in specs})
    # Pipelines always render: a step whose model was skipped is reported as
    # failed (model_unavailable) in each report rather than hiding the pipeline.
    config = render_serve_config([*deployable, *pipelines], options)
    target.apply(config)
    statuses: dict[str, dict[str, Any]] = {}
    wait = getattr(target, "wait_until_running", None)
    if wait is not None:
        statuses = wait([GATEWAY_APP] + [app_name_for(spec) for spec in deployable], timeout_s=wait_timeout_s)
    return ApplyResult(plan=items, config=config, statuses=statuses)

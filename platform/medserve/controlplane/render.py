"""Render one Ray Serve declarative config from the catalog.

The output has the structure `serve deploy`, the dashboard's
PUT /api/serve/applications/ and KubeRay's ``serveConfigV2`` all accept, so
the same rendering feeds every target. It never contains secrets: replicas
read the database URL and keys from their environment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medserve.audit.monitor import COMPLIANCE_APP, COMPLIANCE_DEPLOYMENT
from medserve.catalog import CatalogEntry
from medserve.engines.registry import ENGINES
from medserve.registry.routing import version_app_name
from medserve.settings import GATEWAY_SETTING_NAMES, Settings
from medserve.specs import DeploymentSpec, PipelineSpec, ReviewSpec, deployments_of, pipelines_of

GATEWAY_APP = "gateway"
GATEWAY_DEPLOYMENT = "Gateway"
ENGINE_DEPLOYMENT = "ModelServer"
# A string, not an import: the control plane names the gateway's application, never loads it.
GATEWAY_IMPORT_PATH = "medserve.gateway.app:build_app"
# The compliance monitor (periodic audit verification, review backlog metrics): one replica per cluster; its
# application and deployment names come from the monitor's module (importing it loads no Ray).
COMPLIANCE_IMPORT_PATH = "medserve.audit.monitor:build_app"
COMPLIANCE_SETTING_NAMES = ("audit_verify_interval_s", "review_metrics_interval_s")
# The vllm application's ingress only relays tokens; the GPUs belong to Ray Serve LLM's deployment.
VLLM_ADAPTER_NUM_CPUS = 0.25


class RenderOptions(BaseModel):
    """How the platform around the models is laid out."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "RenderOptions":
        """The options `up` and the tests use: listen address, TLS files and the gateway's settings."""
        values: dict[str, Any] = {
            "http_host": settings.gateway_host,
            "http_port": settings.gateway_port,
            "gateway_listen_port": settings.gateway_listen_port or None,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
            "gateway_access_log": settings.gateway_serve_access_log,
            "gateway_settings": {name: getattr(settings, name) for name in GATEWAY_SETTING_NAMES},
            "compliance_settings": {name: getattr(settings, name) for name in COMPLIANCE_SETTING_NAMES},
        }
        return cls(**{**values, **overrides})

    http_host: str = Field(default="127.0.0.1", description="Address Serve's HTTP proxy binds.")
    http_port: int = Field(default=8000, description="Port Serve's HTTP proxy binds.")
    gateway_listen_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="The gateway's own port, bound by every gateway replica on http_host (gateway/listener.py); "
        "None: the gateway answers through Serve's ports only.",
    )
    gateway_replicas: int = Field(default=1, ge=1, description="Gateway replicas.")
    gateway_num_cpus: float = Field(default=0.25, ge=0, description="CPUs reserved per gateway replica.")
    gateway_max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="Requests one gateway replica works on at once. The gateway mostly waits (on engines, "
        "the audit commit, streams), so this is high; each model's own limits are enforced at its gate.",
    )
    gateway_access_log: bool = Field(
        default=False,
        description="Ray Serve's access log for the gateway deployment (off: the audit trail records each "
        "request, and the replica's Serve logger keeps warnings and errors only).",
    )
    gateway_settings: dict[str, Any] = Field(default_factory=dict, description="Settings passed to the gateway.")
    gateway_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for gateway replicas (no secrets)."
    )
    compliance_monitor: bool = Field(
        default=True,
        description="Render the compliance application: one replica that verifies the audit trail on a schedule "
        "and exports the review backlog as metrics.",
    )
    compliance_settings: dict[str, Any] = Field(
        default_factory=dict, description="Settings passed to the compliance monitor (its intervals)."
    )
    allow_unpinned_artifacts: bool = Field(default=False, description="Serve artifacts with no pinned sha256.")
    ssl_certfile: str | None = Field(
        default=None, description="PEM certificate chain: Serve's proxy then speaks HTTPS (Serve HTTPOptions)."
    )
    ssl_keyfile: str | None = Field(default=None, description="PEM private key for ssl_certfile.")


def app_name_for(spec: DeploymentSpec) -> str:
    """The application of the version the spec itself names."""
    return version_app_name(spec.name, spec.model.version)


def served_spec(deployment: DeploymentSpec, version_spec: DeploymentSpec) -> DeploymentSpec:
    """A registered version's spec deployed under a catalog deployment: the version
    brings its model, resources and inputs; the deployment its name and access."""
    return version_spec.model_copy(
        update={"name": deployment.name, "access": deployment.access, "alias": deployment.alias,
                "review": deployment.review}
    )


def catalog_entry(spec: DeploymentSpec) -> CatalogEntry:
    return CatalogEntry(
        model_name=spec.model.name,
        model_version=spec.model.version,
        artifact_sha256=spec.model.artifact.sha256,
        task=spec.model.task,
        engine=spec.model.engine,
        app_name=app_name_for(spec),
        deployment_name=ENGINE_DEPLOYMENT,
        departments=list(spec.access.departments),
        max_output_tokens=spec.inputs.max_output_tokens,
        reasoning_to_client=spec.reasoning.return_to_client,
        deployment=spec.name,
        # In the gateway, the limits hold in each gateway replica; in replicas of
        # its own, across all of them (the gateway divides by its replica count).
        max_in_flight=spec.autoscaling.max_ongoing_requests * spec.autoscaling.max_replicas,
        autoscaled=spec.autoscaling.min_replicas < spec.autoscaling.max_replicas,
        max_queued=None if spec.autoscaling.max_queued_requests < 0 else spec.autoscaling.max_queued_requests,
        placement=spec.placement,
        engine_spec=spec.model_dump(mode="json") if spec.placement == "gateway" else None,
        alias=spec.alias,
        review=resolved_review(spec.review, spec.model.task),
    )


def resolved_review(review: ReviewSpec, task: str) -> ReviewSpec:
    """The policy with its kind's default for `required` filled in (what the gateway reads)."""
    return review.model_copy(update={"required": review.effective_required(task)})


def actor_options(spec: DeploymentSpec) -> dict[str, Any]:
    resources = spec.resources
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_bytes:
        options["memory"] = resources.memory_bytes
    if resources.custom:
        options["resources"] = dict(resources.custom)
    if resources.accelerator_type:
        options["accelerator_type"] = resources.accelerator_type
    return options


def replica_config(spec: DeploymentSpec) -> dict[str, Any]:
    scaling = spec.autoscaling
    config: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "max_queued_requests": scaling.max_queued_requests,
        "ray_actor_options": actor_options(spec),
    }
    if scaling.is_fixed:
        config["num_replicas"] = scaling.min_replicas
    else:
        autoscaling: dict[str, Any] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": scaling.metrics_interval_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
        if scaling.downscale_to_zero_delay_s is not None:
            autoscaling["downscale_to_zero_delay_s"] = scaling.downscale_to_zero_delay_s
        if scaling.initial_replicas is not None:
            autoscaling["initial_replicas"] = scaling.initial_replicas
        config["autoscaling_config"] = autoscaling
    return config


# Every application but the gateway opens no HTTP port of its own (render_serve_config sets it on each). With
# direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED) Ray Serve gives every application's ingress replica one, on the
# gateway's host: MEDSERVE_GATEWAY_HOST=0.0.0.0 would put each model on the network, beside the gateway that
# authenticates and audits its callers.
MODEL_APP_ENV: dict[str, str] = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def render_model_app(spec: DeploymentSpec, options: RenderOptions) -> dict[str, Any]:
    engine = ENGINES[spec.model.engine]
    if engine.serve_llm:
        return render_vllm_app(spec, options)
    return {
        "name": app_name_for(spec),
        # No route_prefix: the model is reachable only by handle, through the gateway.
        "route_prefix": None,
        "import_path": engine.app_import_path,
        "args": {"spec": spec.model_dump(mode="json"), "allow_unpinned": options.allow_unpinned_artifacts},
        "deployments": [replica_config(spec)],
    }


def render_vllm_app(spec: DeploymentSpec, options: RenderOptions) -> dict[str, Any]:
    """vLLM through Ray Serve LLM: the GPU deployment is built from ``llm_config`` by the app builder."""
    from medserve.engines.vllm_app import llm_config_for

    adapter = replica_config(spec)
    adapter["ray_actor_options"] = {"num_cpus": VLLM_ADAPTER_NUM_CPUS}
    return {
        "name": app_name_for(spec),
        "route_prefix": None,
        "import_path": ENGINES[spec.model.engine].app_import_path,
        "args": {
            "spec": spec.model_dump(mode="json"),
            "allow_unpinned": options.allow_unpinned_artifacts,
            "llm_config": llm_config_for(spec),
        },
        "deployments": [adapter],
    }


def serve_logging_config(*, access_log: bool) -> dict[str, Any]:
    """A deployment's Serve ``logging_config``; with the access log off, the replica's Serve logger at
    WARNING too.

    Why the level: Serve's "off" is a filter on the log's handlers, so its
    replica still builds a LogRecord for every request (``logger.info`` in
    ``_record_errors_and_metrics``) only to drop it: 6.5% of the gateway
    replica's event-loop samples in a py-spy profile under ``medserve bench``
    load. At WARNING the call returns at the level check. What else that
    logger says at INFO in a replica is its own start and stop, which the
    Serve controller logs as well; warnings and errors still come through,
    and medserve's own loggers are not Serve's.
    """
    if access_log:
        return {"enable_access_log": True}
    return {"enable_access_log": False, "log_level": "WARNING"}


def gateway_actor_options(specs: list[DeploymentSpec], options: RenderOptions) -> dict[str, Any]:
    """The gateway replica's resources: its own plus those of every engine placed in it."""
    in_gateway = [spec for spec in specs if spec.placement == "gateway"]
    actor: dict[str, Any] = {"num_cpus": round(options.gateway_num_cpus + sum(s.resources.num_cpus for s in in_gateway), 6)}
    memory = sum(spec.resources.memory_bytes or 0 for spec in in_gateway)
    if memory:
        actor["memory"] = memory
    return actor


def render_gateway_app(
    specs: list[DeploymentSpec], options: RenderOptions, pipelines: list[PipelineSpec] | None = None
) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": GATEWAY_IMPORT_PATH,
        "args": {
            "catalog": [catalog_entry(spec).model_dump(mode="json") for spec in specs],
            # Each replica enforces its share of the rate limits.
            "settings": {**options.gateway_settings, "gateway_replicas": options.gateway_replicas},
        },
        "deployments": [
            {
                "name": GATEWAY_DEPLOYMENT,
                "num_replicas": options.gateway_replicas,
                "max_ongoing_requests": options.gateway_max_ongoing_requests,
                "ray_actor_options": gateway_actor_options(specs, options),
                "logging_config": serve_logging_config(access_log=options.gateway_access_log),
            }
        ],
    }
    if options.gateway_listen_port is not None:
        app["args"]["listener"] = {
            "host": options.http_host, "port": options.gateway_listen_port,
            "ssl_certfile": options.ssl_certfile, "ssl_keyfile": options.ssl_keyfile,
        }
    if options.allow_unpinned_artifacts and any(spec.placement == "gateway" for spec in specs):
        app["args"]["allow_unpinned"] = True
    if pipelines:
        # Pipelines run inside the gateway (fan-out over model handles), so
        # they travel with it rather than becoming applications of their own.
        app["args"]["pipelines"] = [pipeline.model_dump(mode="json") for pipeline in pipelines]
    if options.gateway_env:
        app["runtime_env"] = {"env_vars": dict(options.gateway_env)}
    return app


def render_compliance_app(options: RenderOptions) -> dict[str, Any]:
    """The compliance monitor: exactly one replica (not one per gateway replica), no route, no CPU reserved
    (it sleeps between rounds; a verification is I/O and hashing for seconds per interval)."""
    return {
        "name": COMPLIANCE_APP,
        "route_prefix": None,
        "import_path": COMPLIANCE_IMPORT_PATH,
        "args": {"settings": dict(options.compliance_settings)},
        "deployments": [
            {
                "name": COMPLIANCE_DEPLOYMENT,
                "num_replicas": 1,
                "max_ongoing_requests": 4,
                "ray_actor_options": {"num_cpus": 0},
            }
        ],
    }


def render_serve_config(
    specs: list[DeploymentSpec | PipelineSpec],
    options: RenderOptions | None = None,
    versions: Mapping[str, Sequence[DeploymentSpec]] | None = None,
) -> dict[str, Any]:
    """The whole Serve config: one gateway application plus one application per
    deployed model version.

    ``versions`` maps a deployment name to the specs of the versions it must
    run (the alias's version, a rollout candidate, the rollback target); by
    default a deployment runs the version its spec names. The gateway's args
    depend on the specs only, never on which versions run, so starting a
    canary or promoting never redeploys the gateway. A spec with placement
    gateway adds no application either: the gateway's replicas load its engine
    (and carry its resources), so changing such a spec redeploys the gateway. Pipeline specs add no
    application: the gateway runs them over the models' handles.
    """
    options = options or RenderOptions()
    versions = versions or {}
    http_options: dict[str, Any] = {"host": options.http_host, "port": options.http_port}
    if options.ssl_certfile and options.ssl_keyfile:
        # Paths, not key material: the files must exist on every node running a proxy.
        http_options["ssl_certfile"] = options.ssl_certfile
        http_options["ssl_keyfile"] = options.ssl_keyfile
    models = deployments_of(specs)
    model_apps = []
    for spec in models:
        if spec.placement == "gateway":
            continue  # loaded by the gateway's replicas: no application of its own
        for version_spec in versions.get(spec.name) or [spec]:
            model_apps.append(render_model_app(served_spec(spec, version_spec), options))
    # The compliance monitor last: the gateway stays first, the models keep their places.
    behind_gateway = [*model_apps, *([render_compliance_app(options)] if options.compliance_monitor else [])]
    for app in behind_gateway:
        app["runtime_env"] = {"env_vars": dict(MODEL_APP_ENV)}
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options,
        "applications": [render_gateway_app(models, options, pipelines_of(specs)), *behind_gateway],
    }

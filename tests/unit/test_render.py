"""The rendered Serve config is what Ray itself accepts, and models have no public route."""

import pytest
from ray.serve.schema import ServeDeploySchema

from medserve.controlplane.render import COMPLIANCE_APP, GATEWAY_APP, RenderOptions, render_serve_config
from medserve.errors import SpecError
from medserve.specs import deployments_of, load_catalog, pipelines_of


def _config(repo_root, **options):
    specs = load_catalog(repo_root / "deployments")
    return specs, render_serve_config(specs, RenderOptions(**options))


def _app(config, name):
    """The gateway by name; a model's application by deployment name (one per version)."""
    return next(app for app in config["applications"] if app["name"] == name or app["name"].startswith(name + "-v"))


def test_rendered_config_passes_rays_own_schema(repo_root):
    _, config = _config(repo_root)
    parsed = ServeDeploySchema.model_validate(config)
    assert {app.name for app in parsed.applications} == {app["name"] for app in config["applications"]}


def test_only_the_gateway_has_a_route(repo_root):
    specs, config = _config(repo_root)
    routes = {app["name"]: app["route_prefix"] for app in config["applications"]}
    assert routes.pop(GATEWAY_APP) == "/"
    assert routes.pop(COMPLIANCE_APP) is None  # the one compliance monitor, reached by handle only
    # One application per model; pipelines run inside the gateway.
    assert len(routes) == len(deployments_of(specs))
    assert set(routes.values()) == {None}


def test_the_gateway_host_opens_the_gateway_only(repo_root):
    """Serve's direct ingress gives every application's ingress replica an HTTP port on http_options.host;
    a model application turns it off, so MEDSERVE_GATEWAY_HOST=0.0.0.0 puts no model on the network."""
    _, config = _config(repo_root, http_host="0.0.0.0")
    assert config["http_options"]["host"] == "0.0.0.0"
    for app in config["applications"]:
        env = app.get("runtime_env", {}).get("env_vars", {})
        if app["name"] == GATEWAY_APP:
            assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in env
        else:
            assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0", app["name"]


def test_pipelines_travel_in_the_gateway_args(repo_root):
    specs, config = _config(repo_root)
    pipelines = {p["name"]: p for p in _app(config, GATEWAY_APP)["args"]["pipelines"]}
    assert set(pipelines) == {p.name for p in pipelines_of(specs)}
    assert [step["model"] for step in pipelines["mr-brain-screen"]["steps"]] == ["brain-mri-tumour"]


def test_gateway_catalog_carries_version_and_digest(repo_root):
    specs, config = _config(repo_root)
    catalog = {entry["model_name"]: entry for entry in _app(config, GATEWAY_APP)["args"]["catalog"]}
    tumour = catalog["brain-mri-tumour"]
    assert tumour["model_version"] == "0.1.1"
    assert tumour["artifact_sha256"] == "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
    assert tumour["app_name"] == "model-brain-mri-tumour-v0-1-1"


def test_resources_and_autoscaling_come_from_the_spec(repo_root):
    specs, config = _config(repo_root)
    ct = _app(config, "model-ct-pancreas-screen")["deployments"][0]
    assert ct["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.25, "resources": {"radiology_gpu": 1.0}}
    assert ct["autoscaling_config"]["min_replicas"] == 0
    assert ct["autoscaling_config"]["initial_replicas"] == 1

    # vllm: the GPUs go to Ray Serve LLM's deployment (a placement group per replica), not the adapter.
    deepseek = _app(config, "model-deepseek-r1-distill-qwen-32b")
    llm_config = deepseek["args"]["llm_config"]
    assert llm_config["accelerator_type"] == "A100"
    assert llm_config["placement_group_config"]["bundle_per_worker"]["GPU"] * 2 == 2
    assert "num_gpus" not in deepseek["deployments"][0]["ray_actor_options"]

    smol = _app(config, "model-smollm2-demo")["deployments"][0]
    assert smol["num_replicas"] == 1 and "autoscaling_config" not in smol


def _keys(value):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys(inner)


def test_no_secrets_in_rendered_config(repo_root, monkeypatch):
    monkeypatch.setenv("MEDSERVE_DATABASE_URL", "postgresql+psycopg://medserve:s3cret@db/medserve")
    _, config = _config(repo_root, gateway_settings={"audit_durability": "strict"})
    assert not {"password", "pseudonym_key", "database_url", "auth_token"} & set(_keys(config))
    assert "s3cret" not in str(config)


def test_autoscaling_reacts_within_seconds_by_default_and_scale_to_zero_has_its_own_delay():
    from medserve.bench.runner import noop_spec

    spec = noop_spec("scaler", "replicas", autoscaling={"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                                         "downscale_to_zero_delay_s": 600})
    config = render_serve_config([spec])
    autoscaling = config["applications"][1]["deployments"][0]["autoscaling_config"]
    # Ray's default metrics_interval_s (10 s) would put a 10 s floor under every scale-up.
    assert autoscaling["metrics_interval_s"] == 2.0 and autoscaling["look_back_period_s"] == 10.0
    assert autoscaling["min_replicas"] == 0 and autoscaling["downscale_to_zero_delay_s"] == 600
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**autoscaling)  # Ray accepts exactly what medserve renders


def test_a_look_back_window_shorter_than_the_report_interval_is_refused():
    from medserve.bench.runner import noop_spec

    with pytest.raises(SpecError, match="look_back_period_s"):
        noop_spec("scaler", "replicas", autoscaling={"max_replicas": 2, "metrics_interval_s": 5, "look_back_period_s": 5})


def test_gateway_settings_are_the_marked_non_secret_fields():
    """The gateway's settings are read off the Settings model, never a hand-kept list."""
    from pydantic import SecretStr

    from medserve.settings import GATEWAY_SETTING_NAMES, Settings

    assert "max_body_bytes" in GATEWAY_SETTING_NAMES and "oidc_issuer" in GATEWAY_SETTING_NAMES
    # Set by the control plane from its own replica count; secrets never travel in a config.
    assert "gateway_replicas" not in GATEWAY_SETTING_NAMES
    for name in GATEWAY_SETTING_NAMES:
        assert SecretStr not in getattr(Settings.model_fields[name].annotation, "__args__", ()), name
        assert Settings.model_fields[name].annotation is not SecretStr, name
    options = RenderOptions.from_settings(Settings())
    assert list(options.gateway_settings) == list(GATEWAY_SETTING_NAMES)


def test_the_gateway_drops_serves_access_log_unless_the_operator_wants_it(repo_root):
    """Every gateway request has its audit record; Serve's access line for it is opt-in (gateway_serve_access_log).
    Off, Serve's logger in the gateway replica keeps warnings and errors only, so the line is not even built."""
    from medserve.settings import Settings

    _, config = _config(repo_root)
    dropped = _app(config, GATEWAY_APP)["deployments"][0]["logging_config"]
    assert dropped == {"enable_access_log": False, "log_level": "WARNING"}
    ServeDeploySchema.model_validate(config)
    options = RenderOptions.from_settings(Settings(gateway_serve_access_log=True))
    wanted = render_serve_config(load_catalog(repo_root / "deployments"), options)
    assert _app(wanted, GATEWAY_APP)["deployments"][0]["logging_config"] == {"enable_access_log": True}
    ServeDeploySchema.model_validate(wanted)

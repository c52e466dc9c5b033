"""The Helm chart: lint, render, validate every object, and check what it promises.

Built-in kinds are validated offline by kubernetes-validate (--strict: unknown
fields fail); the RayService against KubeRay's own CRD schema, read from
../shared/kuberay/ (never copied into the project).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from medserve.controlplane.kuberay import node_resources_from_rayservice
from medserve.controlplane.reconcile import plan
from medserve.specs import load_catalog
from tests.unit.helm_support import (
    CHART,
    GPU_VALUES,
    by_kind,
    one,
    rayservice_crd_schema,
    render,
    run_helm,
    template_args,
)

pytestmark = pytest.mark.slow

# A Kubernetes release whose schemas kubernetes-validate bundles, and the chart's floor.
KUBERNETES_VERSION = "1.33.0"
# Kinds with no built-in schema: the RayService is checked against KubeRay's
# CRD below; the Prometheus operator's kinds are off by default.
CUSTOM_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict[str, Any]]:
    return render(GPU_VALUES)


@pytest.fixture(params=["default", "gpu"])
def docs(request: pytest.FixtureRequest, default_docs, gpu_docs) -> list[dict[str, Any]]:
    return default_docs if request.param == "default" else gpu_docs


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod the release can create, RayService groups included."""
    found = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "Job"}:
            found.append((name, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            found.append((f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]))
            for group in cluster["workerGroupSpecs"]:
                found.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
    return found


def container_env(pod: dict[str, Any]) -> dict[str, Any]:
    """The first container's environment: name -> value (None for one taken from a Secret)."""
    return {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}


def crd_errors(rayservice: dict[str, Any]) -> list[str]:
    """Where a rendered RayService breaks KubeRay's own CRD schema (empty when it passes)."""
    import jsonschema

    errors = sorted(jsonschema.Draft7Validator(rayservice_crd_schema()).iter_errors(rayservice), key=str)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]


# --- lint, render, validate --------------------------------------------------------


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_helm_lint_strict(values: Path | None):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run_helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_builtin_kinds_pass_kubernetes_validate_strict(docs):
    import kubernetes_validate

    kinds = {doc["kind"] for doc in docs}
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Job", "Role", "RoleBinding", "ServiceAccount", "NetworkPolicy", "ConfigMap"} <= kinds
    assert kinds - CUSTOM_KINDS, "nothing built-in was rendered"


def test_kubernetes_validate_strict_catches_unknown_fields(default_docs):
    import kubernetes_validate

    deployment = one(default_docs, "Deployment", "-controlplane")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_rayservice_passes_the_kuberay_crd_schema(docs):
    rayservice = one(docs, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert crd_errors(rayservice) == []


def test_crd_check_rejects_a_misspelt_field(default_docs):
    import jsonschema

    rayservice = yaml.safe_load(yaml.safe_dump(one(default_docs, "RayService")))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = list(jsonschema.Draft7Validator(rayservice_crd_schema()).iter_errors(rayservice))
    assert len(errors) == 1 and "'maxReplica' was unexpected" in errors[0].message


@pytest.mark.parametrize(
    ("bad_values", "path"),
    [
        ("controlPlane:\n  reconcileIntervalSeconds: often\n", "/controlPlane/reconcileIntervalSeconds"),
        ("rayCluster:\n  workerGroups:\n    gpu:\n      gpus: two\n", "/rayCluster/workerGroups/gpu/gpus"),
        ("gateway:\n  port: '8000'\n", "/gateway/port"),
        ("networkPolicy:\n  enabeld: true\n", "/networkPolicy"),
        ("rayCluster:\n  authMode: none\n", "/rayCluster/authMode"),
        ("rayCluster:\n  workerNiceness: -5\n", "/rayCluster/workerNiceness"),
    ],
    ids=["interval-string", "gpus-string", "port-string", "misspelt-key", "auth-mode", "negative-niceness"],
)
def test_values_schema_refuses_wrong_types(tmp_path, bad_values: str, path: str):
    values = tmp_path / "bad.yaml"
    values.write_text(bad_values)
    result = run_helm(*template_args(values), check=False)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert path in result.stderr


# --- the RayService ------------------------------------------------------------------


def test_default_has_a_cpu_group_and_no_gpu_group(default_docs):
    groups = one(default_docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [group["groupName"] for group in groups] == ["cpu"]
    assert "nvidia.com/gpu" not in str(groups)


def test_gpu_group_lands_on_gpu_nodes_with_gpus(gpu_docs):
    groups = one(gpu_docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu = next(group for group in groups if group["groupName"] == "gpu")
    pod = gpu["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    # Helm merges maps: the site narrows the default GPU selector to one product.
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)


def test_reconciler_plans_from_the_groups_the_chart_renders(default_docs, gpu_docs, repo_root):
    """What the KubeRay target reads back from the rendered RayService decides what is served."""
    specs = load_catalog(repo_root / "deployments")

    def deployable(docs: list[dict[str, Any]]) -> set[str]:
        nodes = node_resources_from_rayservice(one(docs, "RayService")["spec"])
        return {item.spec.name for item in plan(specs, nodes, check_engines=False) if item.deploy}

    cpu_only = deployable(default_docs)
    assert {"smollm2-demo", "brain-mri-tumour"} <= cpu_only
    assert "deepseek-r1-distill-qwen-32b" not in cpu_only and "ct-pancreas-screen" not in cpu_only
    # The GPU values add 2 GPUs and the radiology_gpu resource per pod.
    with_gpus = deployable(gpu_docs)
    assert {"ct-pancreas-screen", "deepseek-r1-distill-qwen-32b"} <= with_gpus


def test_gateway_service_and_proxy_listen_on_the_gateway_port(default_docs):
    rayservice = one(default_docs, "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    service = rayservice["spec"]["serveService"]
    assert service["metadata"]["name"] == "rel-medserve-gateway"
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    # The gateway's own port stays off in the chart: the Service selects every Ray pod, and only the pods
    # hosting a gateway replica would answer on it (values.yaml, gateway.listenPort).
    assert "listener" not in next(app for app in serve["applications"] if app["name"] == "gateway")["args"]
    for where, pod in pod_specs(default_docs):
        assert container_env(pod)["MEDSERVE_GATEWAY_LISTEN_PORT"] == "0", where


# --- pods: resources, security, probes, images, no external calls -------------------------


def test_every_container_has_resources_and_runs_non_root(docs):
    for where, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where


def test_control_plane_probes_follow_the_reconcile_heartbeat(default_docs):
    container = one(default_docs, "Deployment", "-controlplane")["spec"]["template"]["spec"]["containers"][0]
    heartbeat = next(arg.split("=", 1)[1] for arg in container["args"] if arg.startswith("--heartbeat-file="))
    interval = int(next(arg.split("=", 1)[1] for arg in container["args"] if arg.startswith("--interval=")))
    liveness = " ".join(container["livenessProbe"]["exec"]["command"])
    assert heartbeat in liveness and f"-lt {3 * interval}" in liveness
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", heartbeat]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_control_plane_runs_a_real_reconcile_command(default_docs):
    """The Deployment's arguments parse with the CLI it runs, and name the chart's RayService."""
    from medserve.cli.main import cli

    container = one(default_docs, "Deployment", "-controlplane")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["medserve"]
    context = cli.make_context("medserve", list(container["args"]), resilient_parsing=False)
    subcommand = cli.get_command(context, container["args"][0])
    params = subcommand.make_context("reconcile", list(container["args"][1:])).params
    assert params["target"] == "kuberay" and params["watch"] is True
    assert params["namespace"] == "clinical-ai"
    assert params["rayservice"] == one(default_docs, "RayService")["metadata"]["name"]
    catalog = one(default_docs, "ConfigMap", "-catalog")["metadata"]["name"]
    volume = next(v for v in one(default_docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "catalog")
    assert volume["configMap"]["name"] == catalog and str(params["deployments_dir"]) == "/etc/medserve/deployments"


def test_images_come_from_the_overridden_registry(default_docs, gpu_docs):
    def images(docs: list[dict[str, Any]]) -> set[str]:
        return {c["image"] for _, pod in pod_specs(docs) for c in pod["containers"]}

    assert images(default_docs) == {"docker.io/medserve/medserve:0.1.0"}
    assert images(gpu_docs) == {"registry.hospital.example/mirror/medserve/medserve:0.1.0"}
    for where, pod in pod_specs(gpu_docs):
        assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}], where


def test_ray_runs_with_token_authentication_set_deliberately(docs, tmp_path):
    # Ray starts a pod that holds no token with its authentication off; KubeRay's authOptions gives every
    # Ray container the token and its own dashboard calls too (the CRD check above validates the field).
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    values = tmp_path / "values.yaml"
    values.write_text("rayCluster:\n  authMode: disabled\n")
    assert one(render(values), "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}


def test_the_audit_spool_outlives_its_pod_on_the_given_claim(default_docs, tmp_path):
    # Without a claim the spool stays in each pod's emptyDir (documented as lost with the pod).
    for where, pod in pod_specs(default_docs):
        assert all(volume["name"] != "audit-spool" for volume in pod["volumes"]), where
    values = tmp_path / "values.yaml"
    values.write_text("auditSpool:\n  existingClaim: medserve-audit-spool\n")
    docs = render(values)
    for where, pod in pod_specs(docs):
        env = container_env(pod)
        mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        if "RayService" not in where:
            assert "audit-spool" not in volumes and "MEDSERVE_AUDIT_SPOOL_DIR" not in env, where
            continue
        assert volumes["audit-spool"]["persistentVolumeClaim"] == {"claimName": "medserve-audit-spool"}, where
        assert env["MEDSERVE_AUDIT_SPOOL_DIR"] == mounts["audit-spool"] == "/var/lib/medserve/audit-spool", where
    assert crd_errors(one(docs, "RayService")) == []


def test_ray_pods_send_no_usage_statistics(docs):
    for where, pod in pod_specs(docs):
        assert container_env(pod)["RAY_USAGE_STATS_ENABLED"] == "0", where


def test_ray_pods_run_replicas_at_the_priority_of_rays_daemons(docs, tmp_path):
    for where, pod in pod_specs(docs):
        assert container_env(pod)["RAY_worker_niceness"] == "0", where
    values = tmp_path / "values.yaml"
    values.write_text("rayCluster:\n  workerNiceness: 15\n")  # Ray's own default, for a site that wants it
    for where, pod in pod_specs(render(values)):
        assert container_env(pod)["RAY_worker_niceness"] == "15", where


# --- labels, RBAC, secrets, hooks ---------------------------------------------------------


def test_every_object_carries_the_standard_labels(docs):
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "medserve", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == "rel", doc["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_role_can_only_get_and_patch_its_rayservice(default_docs):
    role = one(default_docs, "Role")
    name = one(default_docs, "RayService")["metadata"]["name"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayservices"], "resourceNames": [name], "verbs": ["get", "patch"]}
    ]
    binding = one(default_docs, "RoleBinding")
    account = one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "clinical-ai"}]
    assert one(default_docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account
    # Only the reconciler talks to the API server.
    for where, pod in pod_specs(default_docs):
        if "controlplane" not in where:
            assert pod["automountServiceAccountToken"] is False, where


def test_migration_hook_runs_db_upgrade_after_its_secret(default_docs):
    job = one(default_docs, "Job", "-db-upgrade")
    secret = one(default_docs, "Secret")
    hook = job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(hook["helm.sh/hook-weight"])
    assert "before-hook-creation" in hook["helm.sh/hook-delete-policy"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["medserve", "db", "upgrade"]
    env = {item["name"]: item for item in container["env"]}
    assert env["MEDSERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "database-url"}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_generated_secret_has_a_pseudonym_key_and_an_audit_signing_key(default_docs):
    data = one(default_docs, "Secret")["stringData"]
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["pseudonym-key"])
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["audit-signing-key"])
    assert data["audit-signing-key"] != data["pseudonym-key"]
    assert data["database-url"].startswith("postgresql+psycopg://")


def test_every_ray_pod_signs_the_audit_chain_with_the_one_key_from_the_secret(docs):
    # A key per pod (generated into each pod's own MEDSERVE_HOME) made chains written in one pod fail
    # `audit verify` in another, and unverifiable once their pod was gone.
    for where, pod in pod_specs(docs):
        env = {item["name"]: item for item in pod["containers"][0]["env"]}
        key = env.get("MEDSERVE_AUDIT_SIGNING_KEY")
        if "RayService" not in where:
            assert key is None, f"{where} writes no audit records and needs no signing key"
            continue
        assert key is not None, where
        reference = key["valueFrom"]["secretKeyRef"]
        assert reference["key"] == "audit-signing-key" and reference.get("optional") is not True, where
        assert reference["name"] == env["MEDSERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"], where


def test_a_set_audit_signing_key_is_used_as_given(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("secrets:\n  auditSigningKey: from-the-hospital-vault\n")
    assert one(render(values), "Secret")["stringData"]["audit-signing-key"] == "from-the-hospital-vault"


def test_existing_secret_replaces_the_generated_one(gpu_docs):
    assert by_kind(gpu_docs, "Secret") == []
    for where, pod in pod_specs(gpu_docs):
        refs = {i["valueFrom"]["secretKeyRef"]["name"] for i in pod["containers"][0]["env"] if "valueFrom" in i}
        assert refs == {"medserve-secrets"}, where


# --- network, ingress, disruption budget --------------------------------------------


def _ray_policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "NetworkPolicy", "-ray")["spec"]


def test_network_policy_default_admits_only_the_release_and_monitoring(default_docs):
    policy = _ray_policy(default_docs)
    assert policy["policyTypes"] == ["Ingress"]
    rules = policy["ingress"]
    # No clinical network configured: nobody outside reaches the gateway yet.
    assert all("ports" not in rule for rule in rules if "podSelector" in rule["from"][0])
    monitoring = [rule for rule in rules if "namespaceSelector" in rule["from"][0]]
    assert monitoring == [
        {
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    ]


def test_clinical_networks_reach_only_the_gateway_port(gpu_docs):
    rules = _ray_policy(gpu_docs)["ingress"]
    clinical = [rule for rule in rules if any("ipBlock" in peer for peer in rule["from"])]
    assert clinical == [
        {
            "ports": [{"port": 8000, "protocol": "TCP"}],
            "from": [
                {"ipBlock": {"cidr": "10.20.0.0/16"}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
            ],
        }
    ]
    # Every rule admitting anything outside the release's Ray pods names its ports.
    for rule in rules:
        internal = rule["from"] == [_ray_policy(gpu_docs)["ingress"][0]["from"][0]]
        assert internal or rule.get("ports"), rule


def test_control_plane_accepts_no_ingress(default_docs):
    policy = one(default_docs, "NetworkPolicy", "-controlplane")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "ingress" not in policy


def test_ingress_is_off_by_default_and_terminates_tls_when_on(default_docs, gpu_docs):
    assert by_kind(default_docs, "Ingress") == []
    ingress = one(gpu_docs, "Ingress")["spec"]
    assert ingress["tls"] == [{"hosts": ["ai.hospital.example"], "secretName": "medserve-gateway-tls"}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-medserve-gateway", "port": {"name": "serve"}}


def test_pod_disruption_budget_covers_the_ray_workers(default_docs):
    pdb = one(default_docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    worker = one(default_docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert pdb["selector"]["matchLabels"].items() <= worker["template"]["metadata"]["labels"].items()


# --- monitoring switches ----------------------------------------------------------


def test_monitoring_objects_off_render_nothing(default_docs):
    assert by_kind(default_docs, "PodMonitor") == [] and by_kind(default_docs, "PrometheusRule") == []


def test_pod_monitor_scrapes_the_ray_metrics_port(gpu_docs):
    monitor = one(gpu_docs, "PodMonitor")["spec"]
    assert monitor["podMetricsEndpoints"] == [{"port": "metrics", "interval": "30s"}]
    head = one(gpu_docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "metrics", "containerPort": 8080} in head["containers"][0]["ports"]


# --- documentation ------------------------------------------------------------------


def test_every_value_is_documented_with_a_helm_docs_comment():
    """Each key carries a `# --` comment, unless it is a section or inside a documented value."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of open keys
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_./-]+):", line)
        if not match or line.lstrip().startswith("-"):
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        documented = previous.startswith("# --") or (previous.startswith("#") and _comment_block_has_doc(lines, index))
        inherited = any(flag for _, flag in stack)
        following = next((lines[i] for i in range(index + 1, len(lines)) if lines[i].strip()), "")
        is_section = line.rstrip().endswith(":") and len(following) - len(following.lstrip()) > indent
        if not (documented or inherited or is_section):
            undocumented.append(match.group(2))
        stack.append((indent, documented or inherited))
    assert undocumented == []


def _comment_block_has_doc(lines: list[str], index: int) -> bool:
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        if lines[i].strip().startswith("# --"):
            return True
        i -= 1
    return False


def test_chart_readme_covers_every_top_level_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    assert [key for key in values if f"`{key}" not in readme] == []

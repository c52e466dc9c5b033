"""The KubeRay target, through the real `kubernetes` client, against a fake API server.

No Kubernetes API server can run here, so a small HTTP server on 127.0.0.1
plays one RayService: it serves GET, records each PATCH (content type and
body) and merges it into the object the way a merge patch does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is in medserve[dev]")

from medserve.controlplane.kuberay import KubeRayTarget, group_resources, node_resources_from_rayservice  # noqa: E402
from medserve.controlplane.reconcile import apply_catalog  # noqa: E402
from medserve.controlplane.render import RenderOptions, render_serve_config  # noqa: E402
from medserve.errors import ClusterError  # noqa: E402
from medserve.specs import load_catalog, pipelines_of  # noqa: E402

NAMESPACE, NAME = "clinical-ai", "medserve"
PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/{NAME}"


def _worker(name: str, cpu: str, gpu: str | None = None, **extra: Any) -> dict[str, Any]:
    limits = {"cpu": cpu, "memory": "16Gi"}
    if gpu:
        limits["nvidia.com/gpu"] = gpu
    return {
        "groupName": name,
        "replicas": 1,
        "minReplicas": 0,
        "maxReplicas": 2,
        "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-worker", "resources": {"limits": limits}}]}},
        **extra,
    }


def rayservice(workers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "serveConfigV2": "applications: []\n",
            "rayClusterConfig": {
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"spec": {"containers": [{"name": "ray-head", "resources": {"limits": {"cpu": "2"}}}]}},
                },
                "workerGroupSpecs": workers,
            },
        },
        "status": {
            "activeServiceStatus": {
                "applicationStatuses": {
                    "gateway": {"status": "RUNNING"},
                    "model-smollm2-demo": {"status": "DEPLOYING", "message": "waiting for replicas"},
                }
            },
            "pendingServiceStatus": {
                "applicationStatuses": {"model-brain-mri-tumour": {"status": "DEPLOYING"}},
            },
        },
    }


class FakeKubeApi:
    """One RayService behind the Kubernetes REST paths the client uses."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(("GET", self.path))
                if self.path != PATH:
                    self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                    return
                self._send(200, fake.obj)

            def do_PATCH(self) -> None:  # noqa: N802
                fake.requests.append(("PATCH", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != PATH:
                    self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                    return
                fake.patches.append((self.headers["Content-Type"], body))
                fake.obj["spec"].update(body.get("spec", {}))
                self._send(200, fake.obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self) -> Any:
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": "Bearer test-token"}
        return kubernetes.client.ApiClient(configuration)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api():
    fake = FakeKubeApi(rayservice([_worker("cpu", "8"), _worker("gpu", "8", gpu="1")]))
    yield fake
    fake.close()


@pytest.fixture
def target(fake_api: FakeKubeApi) -> KubeRayTarget:
    return KubeRayTarget(NAMESPACE, NAME, api_client=fake_api.api_client())


def test_apply_merge_patches_exactly_the_rendered_config(fake_api, target, repo_root):
    config = render_serve_config(load_catalog(repo_root / "deployments"), RenderOptions(http_host="0.0.0.0"))

    target.apply(config)

    assert len(fake_api.patches) == 1
    content_type, body = fake_api.patches[0]
    assert content_type == "application/merge-patch+json"
    assert list(body) == ["spec"] and list(body["spec"]) == ["serveConfigV2"]
    assert isinstance(body["spec"]["serveConfigV2"], str)
    assert yaml.safe_load(body["spec"]["serveConfigV2"]) == config
    assert target.current_config() == config


def test_reconcile_patches_the_named_rayservice_with_what_it_renders(fake_api, target, repo_root, database_url):
    specs = load_catalog(repo_root / "deployments")
    options = RenderOptions(http_host="0.0.0.0")

    result = apply_catalog(database_url, specs, target, options, check_engines=False, require_approved=False)

    assert [method for method, path in fake_api.requests if path != PATH] == []
    (_, body), = fake_api.patches
    patched = yaml.safe_load(body["spec"]["serveConfigV2"])
    assert patched == result.config
    deployable = [item.spec for item in result.plan if item.deploy]
    assert patched == render_serve_config([*deployable, *pipelines_of(specs)], options)
    # The GPU group has 1 GPU and no accelerator label: the 2-GPU and H100
    # specs are skipped with a reason; the CPU models are served.
    by_name = {item.spec.name: item for item in result.plan}
    assert by_name["smollm2-demo"].deploy and by_name["brain-mri-tumour"].deploy
    assert not by_name["deepseek-r1-distill-qwen-32b"].deploy
    assert "GPU: needs 2" in (by_name["deepseek-r1-distill-qwen-32b"].reason or "")
    apps = [app["name"] for app in patched["applications"]]
    assert not any(name.startswith("model-deepseek") for name in apps) and "model-smollm2-demo-v0-1-2-q4-1" in apps


def test_status_reads_active_and_pending_applications(target):
    statuses = target.application_status()
    assert statuses["gateway"] == {"status": "RUNNING", "message": ""}
    assert statuses["model-smollm2-demo"] == {"status": "DEPLOYING", "message": "waiting for replicas"}
    assert statuses["model-brain-mri-tumour"]["message"].startswith("pending: ")


def test_status_names_a_failed_deployments_reason(fake_api, target):
    from tests.unit.test_targets import FAILED_GATEWAY_DEPLOYMENT

    fake_api.obj["status"]["activeServiceStatus"]["applicationStatuses"]["gateway"] = {
        "status": "DEPLOY_FAILED", "message": "Failed to update the deployments ['Gateway'].",
        "serveDeploymentStatuses": {"Gateway": FAILED_GATEWAY_DEPLOYMENT}}
    message = target.application_status()["gateway"]["message"]
    assert message.startswith("Failed to update the deployments ['Gateway']. Gateway: ")
    assert message.endswith("GatewayListenerError: the gateway's own port 127.0.0.1:8100 is taken by a program "
                            "that is not a gateway replica, or cannot be bound ([Errno 98] Address already in use)")


def test_delete_all_serves_nothing_but_keeps_the_rest(fake_api, target):
    fake_api.obj["spec"]["serveConfigV2"] = "proxy_location: EveryNode\napplications:\n- name: gateway\n"
    target.delete_all()
    (_, body), = fake_api.patches
    assert yaml.safe_load(body["spec"]["serveConfigV2"]) == {"proxy_location": "EveryNode", "applications": []}


def test_missing_rayservice_is_a_cluster_error(fake_api):
    other = KubeRayTarget(NAMESPACE, "no-such-service", api_client=fake_api.api_client())
    with pytest.raises(ClusterError, match="HTTP 404"):
        other.apply({"applications": []})
    assert fake_api.patches == []


def test_status_command_reads_the_rayservice(fake_api, monkeypatch):
    from click.testing import CliRunner

    import medserve.controlplane.kuberay as kuberay
    from medserve.cli.main import cli

    monkeypatch.setattr(kuberay, "load_kubernetes_api", lambda *_a, **_k: fake_api.api_client())
    result = CliRunner().invoke(cli, ["status", "--target", "kuberay", "--namespace", NAMESPACE, "--rayservice", NAME])
    assert result.exit_code == 0, result.output
    assert "model-smollm2-demo" in result.output and "DEPLOYING" in result.output


def test_status_command_prints_a_failed_applications_whole_reason(fake_api, monkeypatch):
    from click.testing import CliRunner

    import medserve.controlplane.kuberay as kuberay
    from medserve.cli.main import cli
    from tests.unit.test_targets import FAILED_GATEWAY_DEPLOYMENT

    fake_api.obj["status"]["activeServiceStatus"]["applicationStatuses"]["gateway"] = {
        "status": "DEPLOY_FAILED", "message": "Failed to update the deployments ['Gateway'].",
        "serveDeploymentStatuses": {"Gateway": FAILED_GATEWAY_DEPLOYMENT}}
    monkeypatch.setattr(kuberay, "load_kubernetes_api", lambda *_a, **_k: fake_api.api_client())
    result = CliRunner().invoke(cli, ["status", "--target", "kuberay", "--namespace", NAMESPACE, "--rayservice", NAME])
    assert result.exit_code == 0, result.output
    assert "cannot be bound ([Errno 98] Address already in use)" in result.output  # past the first 120 characters


def test_reconcile_command_patches_once(fake_api, monkeypatch, repo_root, tmp_path):
    from click.testing import CliRunner

    import medserve.controlplane.kuberay as kuberay
    from medserve.cli.main import cli

    monkeypatch.setattr(kuberay, "load_kubernetes_api", lambda *_a, **_k: fake_api.api_client())
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSERVE_GATEWAY_HOST", "0.0.0.0")
    heartbeat = tmp_path / "beat"
    from medserve.db.engine import upgrade

    upgrade(f"sqlite:///{tmp_path / 'medserve.db'}")
    result = CliRunner().invoke(
        cli,
        [
            "reconcile", "--target", "kuberay", "--namespace", NAMESPACE, "--rayservice", NAME,
            "--deployments", str(repo_root / "deployments"), "--heartbeat-file", str(heartbeat),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "skipped deepseek-r1-distill-qwen-32b" in result.output
    (_, body), = fake_api.patches
    config = yaml.safe_load(body["spec"]["serveConfigV2"])
    assert config["http_options"]["host"] == "0.0.0.0"
    assert heartbeat.exists()


# --- resources from group specs ----------------------------------------------------


def test_group_resources_prefer_ray_start_params():
    group = _worker("gpu", "8", gpu="2")
    group["rayStartParams"] = {"num-cpus": "6", "resources": '"{\\"radiology_gpu\\": 1}"'}
    assert group_resources(group) == {"CPU": 6.0, "GPU": 2.0, "memory": float(16 * 2**30), "radiology_gpu": 1.0}


def test_accelerator_label_advertises_the_accelerator_type():
    group = _worker("gpu", "8", gpu="1")
    group["template"]["metadata"] = {"labels": {"medserve.io/accelerator-type": "H100"}}
    assert group_resources(group)["accelerator_type:H100"] == 1.0


def test_container_limits_and_millicores():
    assert group_resources(_worker("small", "500m"))["CPU"] == 0.5


def test_groups_that_can_have_no_pod_are_left_out():
    spec = rayservice([_worker("off", "4", maxReplicas=0, replicas=0), _worker("on", "4")])["spec"]
    nodes = node_resources_from_rayservice(spec)
    assert [node["CPU"] for node in nodes] == [0.0, 4.0]


def test_fake_server_answers_unknown_paths_with_404(fake_api):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(fake_api.url + "/apis/ray.io/v1/namespaces/x/rayservices/y")
    assert info.value.code == 404


def test_kubeconfig_used_outside_a_pod(tmp_path, monkeypatch):
    from medserve.controlplane.kuberay import load_kubernetes_api

    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = load_kubernetes_api()
    assert client.configuration.host == "https://10.0.0.1:6443"


@pytest.mark.slow
def test_watch_loop_keeps_reconciling_until_sigterm(fake_api, repo_root, tmp_path):
    """The chart's command line, as a process, reaching the fake API server through a kubeconfig."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from medserve.db.engine import upgrade

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
                "users": [{"name": "u", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                "current-context": "fake",
            }
        )
    )
    upgrade(f"sqlite:///{tmp_path / 'medserve.db'}")
    heartbeat = tmp_path / "heartbeat"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSERVE_", "KUBERNETES_"))}
    env.update(
        KUBECONFIG=str(kubeconfig),
        MEDSERVE_HOME=str(tmp_path),
        # The demo models are research-use versions nobody has approved.
        MEDSERVE_REQUIRE_APPROVED_VERSIONS="false",
        PYTHONPATH=str(repo_root / "platform"),
    )
    process = subprocess.Popen(
        [
            sys.executable, "-m", "medserve.cli.main", "reconcile", "--target", "kuberay",
            f"--namespace={NAMESPACE}", f"--rayservice={NAME}", f"--deployments={repo_root / 'deployments'}",
            "--watch", "--interval=1", f"--heartbeat-file={heartbeat}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(fake_api.patches) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(fake_api.patches) >= 2, "the loop did not patch twice"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert heartbeat.exists()
    first, second = (yaml.safe_load(body["spec"]["serveConfigV2"]) for _, body in fake_api.patches[:2])
    assert first == second and "model-smollm2-demo-v0-1-2-q4-1" in {app["name"] for app in first["applications"]}
    assert output.count("applied to RayService clinical-ai/medserve") >= 2

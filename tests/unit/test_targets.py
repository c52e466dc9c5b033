"""The Ray dashboard target: which failures a deploy retries (by the error's flag, not its text)."""

from __future__ import annotations

import pickle

import httpx
import pytest

from medserve.controlplane import targets
from medserve.controlplane.targets import RayClusterTarget
from medserve.errors import ClusterError


def _target(monkeypatch, answers):
    """A target whose dashboard gives the listed answers in turn (an exception: a dropped connection)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, text=f"status {answer}")

    monkeypatch.setattr(targets.time, "sleep", lambda s: None)
    target = RayClusterTarget("http://dashboard.invalid:8265")
    target._client = httpx.Client(base_url=target.dashboard_url, transport=httpx.MockTransport(handler))
    return target, calls


def test_apply_retries_server_errors_and_dropped_connections(monkeypatch):
    target, calls = _target(monkeypatch, [500, 500, 500, httpx.ConnectError("refused"), 200])
    target.apply({"applications": []})
    assert calls == ["PUT"] * 5


def test_apply_does_not_retry_a_refused_config(monkeypatch):
    target, calls = _target(monkeypatch, [400])
    with pytest.raises(ClusterError) as raised:
        target.apply({"applications": []})
    assert calls == ["PUT"]
    assert not raised.value.retryable and "HTTP 400" in raised.value.message


def test_apply_gives_up_after_its_deadline(monkeypatch):
    target, calls = _target(monkeypatch, [503])
    with pytest.raises(ClusterError) as raised:
        target.apply({"applications": []}, retry_s=-1)
    assert raised.value.retryable and len(calls) == 3  # one _request's own attempts, then no more


def test_retryable_survives_pickling():
    error = pickle.loads(pickle.dumps(ClusterError("down", retryable=True, app="x")))
    assert error.retryable and error.details == {"app": "x"} and error.message == "down"


def test_every_target_implements_the_whole_protocol():
    """apply_catalog calls each ServeTarget method directly, so every target has all of them."""
    from medserve.bench.private import ExtraAppsTarget
    from medserve.controlplane.kuberay import KubeRayTarget
    from medserve.controlplane.targets import ServeTarget

    methods = [name for name in vars(ServeTarget) if not name.startswith("_") and callable(vars(ServeTarget)[name])]
    assert "wait_until_running" in methods and "apply" in methods
    for cls in (RayClusterTarget, KubeRayTarget):
        assert [name for name in methods if not callable(getattr(cls, name, None))] == [], cls.__name__
    # The benchmark's wrapper adds apply and wait_until_running and hands the rest on.
    assert callable(ExtraAppsTarget.wait_until_running) and callable(ExtraAppsTarget.apply)


# What Serve's REST API reported when a gateway replica's constructor raised (trimmed traceback).
FAILED_GATEWAY_DEPLOYMENT = {
    "status": "DEPLOY_FAILED",
    "message": (
        "The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "medserve/gateway/listener.py", line 90, in __init__\n'
        "OSError: [Errno 98] Address already in use\n\n"
        "\x1b[36mray::ServeReplica:gateway:Gateway.initialize_and_get_metadata()\x1b[39m (pid=1)\n"
        "medserve.errors.GatewayListenerError: the gateway's own port 127.0.0.1:8100 is taken by a program "
        "that is not a gateway replica, or cannot be bound ([Errno 98] Address already in use)\n"
    ),
}


def test_a_failed_application_names_its_failed_deployments_reason(monkeypatch):
    details = {"applications": {
        "gateway": {"status": "DEPLOY_FAILED", "message": "Failed to update the deployments ['Gateway'].",
                    "deployments": {"Gateway": FAILED_GATEWAY_DEPLOYMENT,
                                    "Healthy": {"status": "HEALTHY", "message": ""}}},
        "model-x": {"status": "RUNNING", "message": "", "deployments": {"ModelServer": {"status": "HEALTHY"}}},
    }}
    target = RayClusterTarget("http://dashboard.invalid:8265")
    target._client = httpx.Client(base_url=target.dashboard_url, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=details)))
    with pytest.raises(ClusterError) as raised:
        target.wait_until_running(["gateway", "model-x"], timeout_s=5)
    # The operator reads the reason in the one error `up` prints, not in the controller's logs.
    assert raised.value.message == (
        "application gateway failed to deploy: Failed to update the deployments ['Gateway']. Gateway: "
        "medserve.errors.GatewayListenerError: the gateway's own port 127.0.0.1:8100 is taken by a program "
        "that is not a gateway replica, or cannot be bound ([Errno 98] Address already in use)")
    assert target.application_status()["model-x"] == {"status": "RUNNING", "message": ""}

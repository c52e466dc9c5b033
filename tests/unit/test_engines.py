"""Engines with the real models, driven through ModelServer without Ray."""

import asyncio

import numpy as np
import pytest

from medserve.engines.serve_app import ModelServer
from medserve.errors import ArtifactIntegrityError
from medserve.specs import load_catalog


@pytest.fixture(scope="module")
def catalog(repo_root):
    return {spec.name: spec for spec in load_catalog(repo_root / "deployments")}


@pytest.fixture(scope="module")
def tumour(catalog):
    return ModelServer(catalog["brain-mri-tumour"].model_dump(mode="json"))


@pytest.fixture(scope="module")
def smol(catalog):
    return ModelServer(catalog["smollm2-demo"].model_dump(mode="json"))


def run(coroutine):
    return asyncio.run(coroutine)


def test_mr_instance_is_classified(tumour, mr_small_path):
    result = run(tumour.classify(mr_small_path.read_bytes(), "application/dicom"))
    labels = {finding["label"] for finding in result["findings"]}
    assert labels == {"glioma", "meningioma", "notumor", "pituitary"}
    assert sum(f["probability"] for f in result["findings"]) == pytest.approx(1.0, abs=1e-3)
    assert result["input"]["modality"] == "MR"
    assert len(result["output_sha256"]) == 64


def test_ct_to_mr_only_model_is_refused(tumour, ct_small_path):
    result = run(tumour.classify(ct_small_path.read_bytes(), "application/dicom"))
    assert result["error"]["code"] == "input_not_supported"
    assert result["error"]["details"]["accepted_modalities"] == ["MR"]


def test_corrupt_dicom_is_an_error_payload(tumour):
    assert run(tumour.classify(b"garbage", "application/dicom"))["error"]["code"] == "invalid_dicom"
    assert run(tumour.classify(b"x", "text/plain"))["error"]["code"] == "unsupported_media_type"


def test_oip_tensors_in_and_out(tumour):
    tensor = np.zeros((1, 240, 240, 3), dtype=np.float32)
    input_name = run(tumour.metadata())["inputs"][0]["name"]
    request = {"inputs": [{"name": input_name, "shape": [1, 240, 240, 3], "datatype": "FP32", "data": tensor.ravel().tolist()}]}
    result = run(tumour.infer(request))
    (output,) = result["outputs"]
    assert output["shape"] == [1, 4]
    assert sum(output["data"]) == pytest.approx(1.0, abs=1e-3)

    bad = {"inputs": [{"name": input_name, "shape": [1, 2], "datatype": "FP32", "data": [0.0, 1.0]}]}
    assert run(tumour.infer(bad))["error"]["code"] == "bad_request"


def test_chat_generates_and_counts_tokens(smol):
    request = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "params": {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 1},
    }
    result = run(smol.chat(request))
    assert result["completion_tokens"] <= 8
    assert result["prompt_tokens"] > 3
    assert result["finish_reason"] in {"stop", "length"}
    assert isinstance(result["text"], str)


def test_prompt_over_the_limit_is_refused(smol):
    request = {
        "messages": [{"role": "user", "content": "word " * 3000}],
        "params": {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 1},
    }
    result = run(smol.chat(request))
    assert result["error"]["code"] == "context_length_exceeded"


def test_tampered_artifact_pin_refuses_to_load(catalog):
    spec = catalog["brain-mri-tumour"]
    artifact = spec.model.artifact.model_copy(update={"sha256": "f" * 64})
    tampered = spec.model_copy(update={"model": spec.model.model_copy(update={"artifact": artifact})})
    with pytest.raises(ArtifactIntegrityError):
        ModelServer(tampered.model_dump(mode="json"))

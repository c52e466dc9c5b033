"""The gateway end to end on a real Ray cluster with the real demo models."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from .conftest import Platform, json_of, new_patient_id

SMOL = "smollm2-135m-instruct"
TUMOUR = "brain-mri-tumour"
TUMOUR_SHA = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"


@pytest.fixture(scope="module")
def app_key(platform: Platform) -> str:
    return platform.key("clinical-app")


def test_gpu_specs_were_skipped_with_reasons(platform: Platform):
    statuses = platform.target.application_status()
    assert statuses["gateway"]["status"] == "RUNNING"
    assert statuses["model-brain-mri-tumour-v0-1-1"]["status"] == "RUNNING"
    assert not any(name.startswith("model-deepseek") for name in statuses)


def test_health_and_readiness(platform: Platform):
    with platform.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        # brain-mri-tumour, smollm2 and the two hu_roi analyzers (GPU specs are skipped).
        assert ready.status_code == 200 and ready.json()["models"] == 4


def test_models_list_shows_versions(platform: Platform, app_key: str):
    with platform.client(app_key) as client:
        data = {m["id"]: m for m in json_of(client.get("/v1/models"))["data"]}
    assert data[TUMOUR]["version"] == "0.1.1"
    assert data[SMOL]["task"] == "llm"


def test_chat_completion_with_the_openai_sdk_leaves_one_audit_row(platform: Platform, app_key: str):
    patient = new_patient_id()
    client = openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key=app_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Name one symptom of influenza."}],
        max_tokens=16,
        temperature=0,
        extra_headers={"X-Patient-Id": patient, "X-Purpose-Of-Use": "TREAT"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens <= 16
    inference_id = raw.headers["x-medserve-inference-id"]

    (row,) = platform.audit_rows_for_patient(patient)
    assert str(row.id) == inference_id
    assert row.outcome == "ok" and row.http_status == 200
    assert row.model_name == SMOL and row.model_version == "0.1.2-q4_1"
    assert row.artifact_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert row.prompt_tokens == completion.usage.prompt_tokens
    assert row.completion_tokens == completion.usage.completion_tokens
    assert row.caller_role == "clinical-app"
    assert len(row.input_sha256) == 64 and len(row.output_sha256) == 64
    # Clinical context is pseudonymised, never stored in clear.
    assert row.patient_pseudonym != patient and patient not in repr(row.__dict__)
    assert row.purpose_pseudonym and row.purpose_pseudonym != "TREAT"


def test_mr_instance_is_analysed_and_audited(platform: Platform, app_key: str, mr_small_path):
    patient = new_patient_id()
    with platform.client(app_key) as client:
        response = client.post(
            f"/v1/imaging/{TUMOUR}",
            content=mr_small_path.read_bytes(),
            headers={"Content-Type": "application/dicom", "X-Patient-Id": patient},
        )
    body = json_of(response)
    assert response.status_code == 200, body
    assert body["status"] == "draft" and body["model_version"] == "0.1.1"
    assert {f["label"] for f in body["findings"]} == {"glioma", "meningioma", "notumor", "pituitary"}
    (row,) = platform.audit_rows_for_patient(patient)
    assert str(row.id) == body["inference_id"]
    assert row.model_version == "0.1.1" and row.artifact_sha256 == TUMOUR_SHA
    assert row.outcome == "ok" and row.operation == "imaging.analyze"


def test_no_key_is_401_and_audited_as_denied(platform: Platform, mr_small_path):
    patient = new_patient_id()
    with platform.client() as client:
        response = client.post(
            f"/v1/imaging/{TUMOUR}",
            content=mr_small_path.read_bytes(),
            headers={"Content-Type": "application/dicom", "X-Patient-Id": patient},
        )
    assert response.status_code == 401
    assert json_of(response)["error"]["code"] == "unauthenticated"
    (row,) = platform.audit_rows_for_patient(patient)
    assert row.outcome == "denied" and row.http_status == 401 and row.api_key_id is None


def test_corrupt_dicom_is_4xx_and_the_next_request_is_served(platform: Platform, app_key: str, mr_small_path):
    patient = new_patient_id()
    headers = {"Content-Type": "application/dicom", "X-Patient-Id": patient}
    with platform.client(app_key) as client:
        bad = client.post(f"/v1/imaging/{TUMOUR}", content=b"\x00" * 132 + b"corrupt", headers=headers)
        good = client.post(f"/v1/imaging/{TUMOUR}", content=mr_small_path.read_bytes(), headers=headers)
    assert bad.status_code == 400
    assert json_of(bad)["error"]["code"] == "invalid_dicom"
    assert patient not in bad.text
    assert good.status_code == 200
    rows = platform.audit_rows_for_patient(patient)
    assert [(r.http_status, r.error_code) for r in rows] == [(400, "invalid_dicom"), (200, None)]


def test_ct_sent_to_an_mr_only_model_is_refused(platform: Platform, app_key: str, ct_small_path):
    with platform.client(app_key) as client:
        response = client.post(
            f"/v1/imaging/{TUMOUR}", content=ct_small_path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
    assert response.status_code == 422
    assert json_of(response)["error"]["code"] == "input_not_supported"


def test_unknown_model_is_404_and_audited(platform: Platform, app_key: str):
    patient = new_patient_id()
    with platform.client(app_key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Patient-Id": patient},
        )
    assert response.status_code == 404 and json_of(response)["error"]["code"] == "model_not_found"
    (row,) = platform.audit_rows_for_patient(patient)
    assert row.outcome == "error" and row.model_name == "no-such-model"


def test_invalid_chat_body_is_400_without_echo(platform: Platform, app_key: str):
    patient = new_patient_id()
    with platform.client(app_key) as client:
        response = client.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": "Jane Doe has sepsis"}',
            headers={"Content-Type": "application/json", "X-Patient-Id": patient},
        )
    assert response.status_code == 400
    assert json_of(response)["error"]["code"] == "invalid_request"
    assert "Jane" not in response.text
    assert len(platform.audit_rows_for_patient(patient)) == 1


def test_auditor_role_cannot_infer(platform: Platform, mr_small_path):
    auditor = platform.key("auditor")
    with platform.client(auditor) as client:
        response = client.post(
            f"/v1/imaging/{TUMOUR}", content=mr_small_path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
    assert response.status_code == 403 and json_of(response)["error"]["code"] == "permission_denied"


def test_open_inference_protocol_v2(platform: Platform, app_key: str):
    with platform.client(app_key) as client:
        metadata = json_of(client.get(f"/v2/models/{TUMOUR}"))
        input_name = metadata["inputs"][0]["name"]
        tensor = np.full((1, 240, 240, 3), 0.5, dtype=np.float32)
        response = client.post(
            f"/v2/models/{TUMOUR}/infer",
            json={"inputs": [{"name": input_name, "shape": [1, 240, 240, 3], "datatype": "FP32",
                              "data": tensor.ravel().tolist()}]},
        )
    body = json_of(response)
    assert response.status_code == 200, body
    assert body["model_version"] == "0.1.1"
    assert body["outputs"][0]["shape"] == [1, 4]

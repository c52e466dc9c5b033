"""One hierarchy, stable codes, one HTTP mapping, no request content in responses."""

import pickle

from fastapi import FastAPI
from fastapi.testclient import TestClient

from medserve.errors import (
    AuthenticationError,
    InvalidDicomError,
    MedserveError,
    ModelNotFoundError,
    error_from_payload,
)
from medserve.gateway.errors import install_error_handlers


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_codes_are_unique_and_statuses_are_http():
    classes = list(_all_subclasses(MedserveError))
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two error classes share a code"
    assert all(400 <= cls.http_status <= 599 for cls in classes)


def test_payload_roundtrip_keeps_type_and_details():
    error = InvalidDicomError(model="x")
    rebuilt = error_from_payload(error.to_payload())
    assert type(rebuilt) is InvalidDicomError
    assert rebuilt.details == {"model": "x"}
    assert type(pickle.loads(pickle.dumps(error))) is InvalidDicomError


def test_handlers_map_to_status_and_never_echo_unexpected_text():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/missing")
    def missing():
        raise ModelNotFoundError()

    @app.get("/auth")
    def auth():
        raise AuthenticationError()

    @app.get("/boom")
    def boom():
        raise ValueError("patient 12345 John Smith")

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/missing").json()["error"]["code"] == "model_not_found"
    assert client.get("/missing").status_code == 404
    response = client.get("/auth")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    crashed = client.get("/boom")
    assert crashed.status_code == 500
    assert "John" not in crashed.text and crashed.json()["error"]["code"] == "internal_error"


def test_framework_errors_and_validation_use_the_typed_payloads():
    """404, 405 and a body that fails validation answer with the same codes and words as before."""
    from pydantic import BaseModel

    app = FastAPI()
    install_error_handlers(app)

    class Body(BaseModel):
        n: int

    @app.post("/items")
    def items(body: Body):
        return {"n": body.n}

    client = TestClient(app, raise_server_exceptions=False)
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not available."}}
    wrong = client.get("/items")
    assert wrong.status_code == 405
    assert wrong.json() == {"error": {"code": "method_not_allowed", "message": "Not available."}}
    invalid = client.post("/items", json={"n": "many"})
    assert invalid.status_code == 400
    assert invalid.json() == {
        "error": {"code": "invalid_request", "message": "The request is invalid.", "details": {"fields": ["body.n"]}}
    }


def test_engine_failure_payload_is_the_inference_error():
    from medserve.errors import InferenceError

    assert InferenceError().to_payload() == {
        "error": {"code": "inference_failed", "message": "The model failed to produce a result."}
    }

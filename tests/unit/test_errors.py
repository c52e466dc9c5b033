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
    boom = client.get("/boom")
    assert boom.status_code == 500
    assert "John" not in boom.text and boom.json()["error"]["code"] == "internal_error"

"""The gateway's OpenAPI document tells the truth: the shared error-responses table, and schemathesis
with every check against the real app in-process (engines canned) for the three roles.

The same schemathesis run against a live gateway on Ray is tests/integration/test_openapi_truth.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import uvicorn
from pydantic import ValidationError

from medserve.bench.private import free_port
from medserve.errors import (
    AuthenticationError,
    DatabaseUnavailableError,
    MedserveError,
    ModelOverloadedError,
    ModelUnavailableError,
    PermissionDeniedError,
    RateLimitedError,
    RequestValidationFailed,
    TokenBudgetExceededError,
)
from medserve.gateway.app import create_app
from medserve.gateway.errors import error_response
from medserve.gateway.openapi import BEARER, error_responses, error_schema
from medserve.protocols.oip import MAX_ELEMENTS, InferRequest
from medserve.security.roles import PUBLIC, ROUTE_PERMISSIONS

from ..schemathesis_run import ROLES, run_schemathesis
from .fake_gateway import CannedGateway, gateway_client, make_key

METHODS = {"get", "post", "put", "patch", "delete"}


def _all_error_classes() -> list[type[MedserveError]]:
    found, stack = [MedserveError], [MedserveError]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, operation)
            for path, operations in document["paths"].items()
            for method, operation in operations.items() if method in METHODS]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app().openapi()


def test_the_table_has_one_entry_per_status_with_the_codes_of_the_classes_named():
    responses = error_responses(
        (AuthenticationError, PermissionDeniedError), (RateLimitedError, TokenBudgetExceededError),
        (ModelUnavailableError, ModelOverloadedError, DatabaseUnavailableError),
    )
    assert sorted(responses) == [401, 403, 429, 503]
    codes = {status: r["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"]["enum"]
             for status, r in responses.items()}
    assert codes == {
        401: ["unauthenticated"],
        403: ["permission_denied"],
        429: ["rate_limited", "token_budget_exceeded"],
        503: ["database_unavailable", "model_overloaded", "model_unavailable"],
    }
    assert responses[401]["headers"]["WWW-Authenticate"]["required"] is True
    assert responses[429]["headers"]["Retry-After"]["required"] is True
    assert responses[503]["headers"]["Retry-After"]["required"] is True
    assert "headers" not in responses[403]
    assert "`rate_limited`" in responses[429]["description"]


@pytest.mark.parametrize("error_class", _all_error_classes(), ids=lambda cls: cls.code)
def test_what_the_one_mapping_answers_matches_the_table(error_class: type[MedserveError]):
    """Each error class, answered by gateway/errors.py, has the status, body and headers its table entry states."""
    error = error_class("a safe message", model="brain-mri-tumour")
    response = error_response(error)
    entry = error_responses([error_class])[error_class.http_status]
    jsonschema.validate(orjson.loads(response.body), entry["content"]["application/json"]["schema"])
    for header in entry.get("headers", {}):
        assert response.headers.get(header), (error_class.code, header)
    with pytest.raises(jsonschema.ValidationError):  # the enum holds: another code is not this entry
        jsonschema.validate(RequestValidationFailed().to_payload(), error_schema(["not_the_code"]))


def test_every_protected_operation_declares_bearer_auth_and_its_refusals(document):
    operations = _operations(document)
    assert {(method, path) for method, path, _ in operations} <= set(ROUTE_PERMISSIONS)
    assert document["components"]["securitySchemes"][BEARER] == {
        "type": "http", "scheme": "bearer", "description": "An API key (msk_...) or an OIDC access token."}
    protected = 0
    for method, path, operation in operations:
        responses = operation["responses"]
        if ROUTE_PERMISSIONS[(method, path)] is PUBLIC:
            assert "security" not in operation and "401" not in responses, (method, path)
            continue
        protected += 1
        assert operation["security"] == [{BEARER: []}], (method, path)
        assert {"401", "403", "429", "503"} <= set(responses), (method, path)
    assert protected >= 20


def test_every_documented_error_is_a_real_code_with_that_status_and_no_framework_422(document):
    status_of = {cls.code: cls.http_status for cls in _all_error_classes()}
    assert "HTTPValidationError" not in orjson.dumps(document).decode()
    for method, path, operation in _operations(document):
        for status, response in operation["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            for branch in schema.get("anyOf", [schema]):
                code = branch.get("properties", {}).get("error", {}).get("properties", {}).get("code", {})
                for value in code.get("enum", []):
                    assert status_of[value] == int(status), (method, path, status, value)
            if status.startswith(("4", "5")) and path != "/readyz":
                assert "enum" in schema["properties"]["error"]["properties"]["code"], (method, path, status)


def test_the_content_types_answered_are_the_ones_documented(document):
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    report = document["paths"]["/v1/pipelines/{name}/studies"]["post"]["responses"]["200"]["content"]
    assert set(report) == {"application/json", "application/fhir+json"}
    imaging = document["paths"]["/v1/imaging/{name}"]["post"]["requestBody"]["content"]
    assert set(imaging) == {"application/dicom", "image/png"}


@pytest.mark.slow
def test_schemathesis_with_every_check_passes_in_process_for_three_roles(tmp_path: Path, database_url: str):
    """The real app and GatewayState over HTTP (uvicorn), engines canned: every check, three roles."""
    with gateway_client(tmp_path, database_url) as (client, _state):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            runs = [run_schemathesis(f"http://127.0.0.1:{port}", make_key(database_url, role), role,
                                     max_examples=5, workdir=tmp_path) for role in ROLES]
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    for run in runs:
        print(run.summary)
    failed = [run for run in runs if run.returncode != 0]
    assert not failed, "\n\n".join(f"{run.role}:\n{run.failure_report}" for run in failed)
    # Every operation the document names was exercised, for every role.
    tested = f"Tested: {len(_operations(client.app.openapi()))}"
    assert all(tested in run.summary for run in runs), [run.summary for run in runs]


def _check_against_document(document: dict[str, Any], method: str, template: str, response: Any) -> None:
    """The answer's status, content type, headers and body are the ones the document states."""
    responses = document["paths"][template][method.lower()]["responses"]
    assert str(response.status_code) in responses, (method, template, response.status_code, response.text[:300])
    entry = responses[str(response.status_code)]
    media = response.headers["content-type"].split(";")[0].strip()
    assert media in entry["content"], (method, template, media)
    schema = entry["content"][media]["schema"]
    body = response.text if media == "text/event-stream" else response.json()
    jsonschema.validate(body, {**schema, "components": document["components"]})
    for name, header in entry.get("headers", {}).items():
        assert not header.get("required") or name in response.headers, (method, template, name)


class _CannedStream:
    """What a streaming replica handle's call returns: events, then the end (engine boundary, as CannedGateway)."""

    def __init__(self) -> None:
        self._events = iter([
            {"type": "start", "prompt_tokens": 5},
            {"type": "delta", "content": "ok", "reasoning": "", "tokens": 1},
            {"type": "end", "prompt_tokens": 5, "completion_tokens": 1, "finish_reason": "stop"},
        ])

    async def __anext__(self) -> dict[str, Any]:
        try:
            return next(self._events)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        pass


class _StreamingGateway(CannedGateway):
    def _stream_handle(self, entry: Any) -> Any:
        call = type("Call", (), {"remote": staticmethod(lambda *args: _CannedStream())})
        return type("Handle", (), {"generate_stream": call})()


def test_real_answers_of_each_kind_match_their_documented_schemas(tmp_path: Path, database_url: str, mr_small_path):
    """Success bodies (which the fuzzer's drawn names rarely reach) and errors, from the real routes."""
    infer = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}
    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    with gateway_client(tmp_path, database_url, state_class=_StreamingGateway) as (client, _state):
        document = client.get("/openapi.json").json()
        app = {"Authorization": f"Bearer {make_key(database_url, 'clinical-app')}", "X-Patient-Id": "MRN-1"}
        auditor = {"Authorization": f"Bearer {make_key(database_url, 'auditor')}"}
        dicom = {**app, "Content-Type": "application/dicom"}
        calls = [
            ("GET", "/v1/models", client.get("/v1/models", headers=app)),
            ("GET", "/v2/models/{name}", client.get("/v2/models/brain-mri-tumour", headers=app)),
            ("POST", "/v1/imaging/{name}",
             client.post("/v1/imaging/brain-mri-tumour", content=mr_small_path.read_bytes(), headers=dicom)),
            ("POST", "/v2/models/{name}/infer", client.post("/v2/models/brain-mri-tumour/infer", json=infer, headers=app)),
            ("POST", "/v1/chat/completions", client.post("/v1/chat/completions", json=chat, headers=app)),
            ("POST", "/v1/chat/completions",
             client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=app)),
            ("GET", "/v1/pipelines", client.get("/v1/pipelines", headers=app)),
            ("GET", "/admin/audit", client.get("/admin/audit", headers=auditor)),
            ("GET", "/v1/reviews/pending", client.get("/v1/reviews/pending", headers=auditor)),
            ("GET", "/v1/reviews/summary", client.get("/v1/reviews/summary", headers=auditor)),
            ("GET", "/healthz", client.get("/healthz")),
            # Errors: 401 with WWW-Authenticate, 403, 404, 415, 400 for a bad query and a bad body.
            ("GET", "/v1/models", client.get("/v1/models")),
            ("GET", "/admin/audit", client.get("/admin/audit", headers=app)),
            ("POST", "/v1/imaging/{name}", client.post("/v1/imaging/no-such-model", content=b"x", headers=dicom)),
            ("POST", "/v1/imaging/{name}", client.post("/v1/imaging/brain-mri-tumour", content=b"x",
                                                       headers={**app, "Content-Type": "text/plain"})),
            ("GET", "/admin/audit", client.get("/admin/audit", params={"since": "0.5"}, headers=auditor)),
            ("POST", "/v1/chat/completions", client.post("/v1/chat/completions", json={"model": 1}, headers=app)),
        ]
    statuses = [(template, response.status_code) for _, template, response in calls]
    assert [status for _, status in statuses] == [200] * 11 + [401, 403, 404, 415, 400, 400], statuses
    audit_page = calls[7][2].json()
    streamed = calls[5][2]
    assert streamed.headers["content-type"].startswith("text/event-stream") and "data: [DONE]" in streamed.text
    assert '"content":"ok"' in streamed.text.replace(" ", ""), streamed.text[:300]
    assert audit_page["data"], "the audit page should hold the calls above"
    for method, template, response in calls:
        _check_against_document(document, method, template, response)


@pytest.mark.parametrize("shape", [[2**70], [2**40, 2**40], [MAX_ELEMENTS, 2], [-1, 4]])
def test_tensor_shapes_the_fuzzer_found_are_refused_as_invalid_not_crashes(shape: list[int]):
    """Shapes beyond int64, or whose int64 product wraps, were a 500 (numpy's OverflowError) or slipped through."""
    tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": [0.5]}
    with pytest.raises(ValidationError):
        InferRequest.model_validate({"inputs": [tensor]})


def test_queries_the_fuzzer_found_are_400_not_500(tmp_path: Path, database_url: str):
    with gateway_client(tmp_path, database_url) as (client, _state):
        auditor = {"Authorization": f"Bearer {make_key(database_url, 'auditor')}"}
        admin = {"Authorization": f"Bearer {make_key(database_url, 'admin')}"}
        huge_offset = client.get("/admin/audit", params={"offset": 2**63}, headers=auditor)
        huge_window = client.get("/admin/models/brain-mri-tumour/comparison", params={"since_minutes": 4e46},
                                 headers=admin)
        number_as_time = client.get("/admin/audit", params={"until": "0.5"}, headers=auditor)
    for response in (huge_offset, huge_window, number_as_time):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_request"

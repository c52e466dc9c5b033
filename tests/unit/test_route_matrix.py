"""Every role against every route of the gateway, from the one table of route permissions."""

from __future__ import annotations

import uuid

import pytest
from fastapi import Depends, Request
from starlette.routing import compile_path
from sqlalchemy import select

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.gateway.app import create_app, route_table
from medserve.gateway.state import GatewayState, get_gateway
from medserve.security.roles import ROUTE_PERMISSIONS, Role, has_permission

from .fake_gateway import gateway_client, make_key

SMOL = "smollm2-135m-instruct"
TUMOUR = "brain-mri-tumour"

# Requests that the canned engines answer with 200 when the role may call the route.
SAMPLES: dict[tuple[str, str], dict] = {
    ("POST", "/v1/chat/completions"): {
        "json": {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    },
    ("POST", "/v1/imaging/{name}"): {"content": b"DICM", "headers": {"Content-Type": "application/dicom"}},
    ("POST", "/v2/models/{name}/infer"): {
        "json": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]}
    },
}


def app_routes() -> list[tuple[str, str]]:
    return route_table(create_app())


def concrete_path(path: str) -> str:
    _, _, convertors = compile_path(path)
    values = {name: (TUMOUR if name == "name" else str(uuid.uuid4())) for name in convertors}
    return path.format(**values)


def test_every_route_is_declared_and_every_declaration_is_a_route():
    routes = set(app_routes())
    assert sorted(routes - set(ROUTE_PERMISSIONS)) == [], "declare these routes in security/roles.py ROUTE_PERMISSIONS"
    assert sorted(set(ROUTE_PERMISSIONS) - routes) == [], "ROUTE_PERMISSIONS names routes the app does not have"


def test_role_by_route_matrix(tmp_path, database_url):
    keys = {role: make_key(database_url, role.value) for role in Role}
    failures = []
    with gateway_client(tmp_path, database_url) as (client, _state):
        for method, path in app_routes():
            if path.startswith("/console"):
                continue  # the console signs in with a session cookie: tests/unit/test_console.py's matrix
            permission = ROUTE_PERMISSIONS[(method, path)]
            sample = SAMPLES.get((method, path), {"json": {}} if method in {"POST", "PUT", "PATCH"} else {})
            url = concrete_path(path)
            anonymous = client.request(method, url, **sample)
            if permission is None:
                if anonymous.status_code in (401, 403):
                    failures.append(f"{method} {path}: public route refused anonymous ({anonymous.status_code})")
                continue
            if anonymous.status_code != 401:
                failures.append(f"{method} {path}: anonymous got {anonymous.status_code}, not 401")
            for role, key in keys.items():
                headers = {**sample.get("headers", {}), "Authorization": f"Bearer {key}"}
                response = client.request(method, url, **{**sample, "headers": headers})
                allowed = has_permission(role, permission)
                if allowed and response.status_code in (401, 403):
                    failures.append(f"{method} {path} as {role.value}: refused ({response.status_code})")
                if allowed and (method, path) in SAMPLES and response.status_code != 200:
                    failures.append(f"{method} {path} as {role.value}: {response.status_code} {response.text[:120]}")
                if not allowed and (
                    response.status_code != 403 or response.json()["error"]["code"] != "permission_denied"
                ):
                    failures.append(f"{method} {path} as {role.value}: {response.status_code}, expected 403")
    assert failures == []


def test_refusals_on_inference_routes_are_audited(tmp_path, database_url):
    key = make_key(database_url, "auditor")
    with gateway_client(tmp_path, database_url) as (client, state):
        response = client.post(f"/v1/imaging/{TUMOUR}", content=b"x",
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"})
    assert response.status_code == 403
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(AuditRecord).where(AuditRecord.caller_role == "auditor")))
    assert [(r.http_status, r.error_code, r.outcome) for r in rows] == [(403, "permission_denied", "denied")]


def test_an_undeclared_route_is_refused_to_every_role(tmp_path, database_url, monkeypatch):
    import medserve.gateway.app as app_module

    original = app_module.create_app

    def with_extra_route():
        app = original()

        @app.get("/v1/undeclared")
        async def undeclared(request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict:
            await gateway.principal(request)
            return {"leak": True}

        return app

    monkeypatch.setattr("tests.unit.fake_gateway.create_app", with_extra_route)
    assert ("GET", "/v1/undeclared") in route_table(with_extra_route())
    key = make_key(database_url, "admin")
    with gateway_client(tmp_path, database_url) as (client, _):
        response = client.get("/v1/undeclared", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403 and "leak" not in response.text


@pytest.mark.parametrize(
    ("department", "model", "status"),
    [("icu", "ct-pancreas-screen", 403), ("radiology", "ct-pancreas-screen", 200), ("icu", TUMOUR, 200)],
)
def test_department_bound_keys_reach_only_their_departments_models(tmp_path, database_url, department, model, status):
    key = make_key(database_url, "clinical-app", department)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}
    with gateway_client(tmp_path, database_url) as (client, _):
        response = client.post(f"/v1/imaging/{model}", content=b"DICM", headers=headers)
        listed = {m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]}
    assert response.status_code == status
    assert (model in listed) == (status == 200)


def test_routes_never_check_role_permissions_themselves(repo_root):
    """One permission source: ROUTE_PERMISSIONS, checked by GatewayState.principal for every route.
    Routes make only object-level checks (require_department), never require(principal, Permission.X)."""
    import ast

    offenders = []
    for path in sorted((repo_root / "platform" / "medserve" / "gateway" / "routes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require":
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and any(alias.name == "Permission" for alias in node.names):
                offenders.append(f"{path.name}:{node.lineno} imports Permission")
    assert offenders == []

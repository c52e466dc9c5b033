"""Roles and the permissions each one carries.

Routes ask for a permission, never for a role, so adding a role is one edit
here and cannot leave a route unguarded.
"""

from __future__ import annotations

import re
from enum import Enum

from starlette.routing import compile_path


class Role(str, Enum):
    ADMIN = "admin"  # deploy, manage keys, roll out versions
    CLINICAL_APP = "clinical-app"  # call models on behalf of an application
    CLINICIAN = "clinician"  # call models and sign off results
    AUDITOR = "auditor"  # read the audit trail; no inference
    OPS = "ops"  # status and metrics


class Permission(str, Enum):
    INFER = "infer"
    LIST_MODELS = "list_models"
    REVIEW = "review"
    READ_AUDIT = "read_audit"
    ADMINISTER = "administer"
    READ_STATUS = "read_status"
    READ_REVIEWS = "read_reviews"  # list unreviewed results and override rates


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(
        {Permission.ADMINISTER, Permission.LIST_MODELS, Permission.READ_STATUS, Permission.READ_AUDIT}
    ),
    Role.CLINICAL_APP: frozenset({Permission.INFER, Permission.LIST_MODELS}),
    Role.CLINICIAN: frozenset({Permission.INFER, Permission.LIST_MODELS, Permission.REVIEW, Permission.READ_REVIEWS}),
    Role.AUDITOR: frozenset({Permission.READ_AUDIT, Permission.LIST_MODELS, Permission.READ_REVIEWS}),
    Role.OPS: frozenset({Permission.READ_STATUS, Permission.LIST_MODELS}),
}


def has_permission(role: Role, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[role]


# Every route of the gateway and the permission it needs: the single source
# the gateway enforces (``GatewayState.principal`` looks the matched route up
# here) and the role-by-route test walks. ``None`` marks a public route (probes,
# the OpenAPI document). A route missing from this table is refused to every
# caller (fail closed) and fails the matrix test: add new routes here.
PUBLIC = None
ROUTE_PERMISSIONS: dict[tuple[str, str], Permission | None] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/v1/models"): Permission.LIST_MODELS,
    ("GET", "/v2/models/{name}"): Permission.LIST_MODELS,
    ("POST", "/v1/chat/completions"): Permission.INFER,
    ("POST", "/v1/completions"): Permission.INFER,
    ("POST", "/v1/imaging/{name}"): Permission.INFER,
    ("POST", "/v2/models/{name}/infer"): Permission.INFER,
    ("GET", "/v1/pipelines"): Permission.LIST_MODELS,
    ("POST", "/v1/pipelines/{name}/studies"): Permission.INFER,
    ("POST", "/v1/reviews/{inference_id}"): Permission.REVIEW,
    ("GET", "/v1/reviews/pending"): Permission.READ_REVIEWS,
    ("GET", "/v1/reviews/summary"): Permission.READ_REVIEWS,
    # Stored reports may hold answer and input texts: the same readers as the review queue.
    ("GET", "/v1/reports/{report_id}"): Permission.READ_REVIEWS,
    ("GET", "/admin/audit"): Permission.READ_AUDIT,
    ("GET", "/admin/models"): Permission.ADMINISTER,
    ("GET", "/admin/models/{name}/versions"): Permission.ADMINISTER,
    ("POST", "/admin/models/versions"): Permission.ADMINISTER,
    ("POST", "/admin/models/{name}/versions/{version}/{action}"): Permission.ADMINISTER,
    ("PUT", "/admin/models/{name}/aliases/{alias}"): Permission.ADMINISTER,
    ("POST", "/admin/models/{name}/rollout"): Permission.ADMINISTER,
    ("POST", "/admin/models/{name}/promote"): Permission.ADMINISTER,
    ("POST", "/admin/models/{name}/rollback"): Permission.ADMINISTER,
    ("GET", "/admin/models/{name}/history"): Permission.ADMINISTER,
    ("GET", "/admin/models/{name}/comparison"): Permission.ADMINISTER,
    # The review console (HTML pages, signed in with a session cookie instead of a bearer header): the sign-in
    # form and its own stylesheet and script are public; pages are the queue's readers; decisions need REVIEW.
    ("GET", "/console/login"): PUBLIC,
    ("POST", "/console/login"): PUBLIC,
    ("GET", "/console/login/oidc"): PUBLIC,
    ("GET", "/console/login/oidc/callback"): PUBLIC,
    ("GET", "/console/static/{file_name}"): PUBLIC,
    ("POST", "/console/logout"): Permission.READ_REVIEWS,
    ("GET", "/console"): Permission.READ_REVIEWS,
    ("GET", "/console/results/{result_id}"): Permission.READ_REVIEWS,
    ("POST", "/console/results/{result_id}/decision"): Permission.REVIEW,
    ("GET", "/console/overrides"): Permission.READ_REVIEWS,
}


class UndeclaredRouteError(LookupError):
    """A route was called that ROUTE_PERMISSIONS does not name."""


def _compiled() -> list[tuple[str, re.Pattern[str], Permission | None]]:
    # Rebuilt when the table changes (tests and plug-ins may add entries).
    global _COMPILED_FOR, _COMPILED
    snapshot = tuple(ROUTE_PERMISSIONS.items())
    if _COMPILED_FOR != snapshot:
        _COMPILED = [(method, compile_path(template)[0], permission) for (method, template), permission in snapshot]
        _COMPILED_FOR = snapshot
    return _COMPILED


_COMPILED_FOR: tuple = ()
_COMPILED: list[tuple[str, re.Pattern[str], Permission | None]] = []


def route_permission(method: str, path: str) -> Permission | None:
    """The permission a request needs, by matching its concrete path against the table's templates.

    Raises UndeclaredRouteError when no declared route matches (the gateway then refuses).
    """
    method = "GET" if method.upper() == "HEAD" else method.upper()
    if (method, path) in ROUTE_PERMISSIONS:
        return ROUTE_PERMISSIONS[(method, path)]
    for declared_method, pattern, permission in _compiled():
        if declared_method == method and pattern.match(path):
            return permission
    raise UndeclaredRouteError(f"{method} {path}")

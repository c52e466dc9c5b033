"""Roles and the permissions each one carries.

Routes ask for a permission, never for a role, so adding a role is one edit
here and cannot leave a route unguarded.
"""

from __future__ import annotations

from enum import Enum


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


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(
        {Permission.ADMINISTER, Permission.LIST_MODELS, Permission.READ_STATUS, Permission.READ_AUDIT}
    ),
    Role.CLINICAL_APP: frozenset({Permission.INFER, Permission.LIST_MODELS}),
    Role.CLINICIAN: frozenset({Permission.INFER, Permission.LIST_MODELS, Permission.REVIEW}),
    Role.AUDITOR: frozenset({Permission.READ_AUDIT, Permission.LIST_MODELS}),
    Role.OPS: frozenset({Permission.READ_STATUS, Permission.LIST_MODELS}),
}


def has_permission(role: Role, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[role]

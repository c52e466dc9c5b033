"""The audit trail as FHIR R4: a Bundle (type collection) of AuditEvent resources.

Mapping (https://hl7.org/fhir/R4/auditevent.html):
- type: audit-event-type ``rest``; subtype: the medserve operation (e.g. chat.completions)
- action ``E`` (execute); recorded: the record's time; outcome: 0 ok, 4 denied or
  cancelled, 8 error; outcomeDesc: HTTP status and error code
- agent: the caller (API key id, name, role, department), requestor = true
- source: this gateway (security-source-type 4, application server)
- entity: the model (name, version, artifact sha256, input/output digests,
  token counts, the hash-chain position) and, when present, the patient and
  encounter *pseudonyms* (never clear identifiers)
"""

from __future__ import annotations

import uuid
from typing import Any

from medserve.audit.chain import _timestamp
from medserve.db.models import utcnow

OUTCOME_CODES = {"ok": "0", "denied": "4", "cancelled": "4", "error": "8"}
SYSTEM = "urn:medserve"


def _detail(name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"type": name, "valueString": str(value)}


def audit_event(record: dict[str, Any]) -> dict[str, Any]:
    recorded = _timestamp(record["created_at"])
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser" if record.get("caller_role") == "clinician" else "dataprocessor"}]},
        "requestor": True,
    }
    if record.get("api_key_id"):
        agent["who"] = {"identifier": {"system": f"{SYSTEM}:api-key", "value": record["api_key_id"]},
                        "display": record.get("caller_name") or record["api_key_id"]}
    else:
        agent["name"] = "unauthenticated caller"
    if record.get("caller_role"):
        agent["role"] = [{"coding": [{"system": f"{SYSTEM}:role", "code": record["caller_role"]}]}]
    if record.get("department"):
        agent["location"] = {"display": record["department"]}

    model = record.get("model_name")
    model_details = [
        _detail("model_version", record.get("model_version")),
        _detail("artifact_sha256", record.get("artifact_sha256")),
        _detail("outcome", record.get("outcome")),
        _detail("http_status", record.get("http_status")),
        _detail("error_code", record.get("error_code")),
        _detail("latency_ms", record.get("latency_ms")),
        _detail("input_sha256", record.get("input_sha256")),
        _detail("output_sha256", record.get("output_sha256")),
        _detail("prompt_tokens", record.get("prompt_tokens")),
        _detail("completion_tokens", record.get("completion_tokens")),
        _detail("chain_id", record.get("chain_id")),
        _detail("chain_seq", record.get("seq")),
        _detail("record_hash", record.get("record_hash")),
    ]
    entities: list[dict[str, Any]] = [{
        "what": {"identifier": {"system": f"{SYSTEM}:model",
                                "value": f"{model or '-'}@{record.get('model_version') or '-'}"},
                 "display": model or "unknown model"},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "name": model or "unknown model",
        "detail": [d for d in model_details if d is not None],
    }]
    for kind, column, code, display in (("patient", "patient_pseudonym", "1", "Person"),
                                        ("encounter", "encounter_pseudonym", "2", "System Object")):
        if record.get(column):
            entities.append({
                "what": {"identifier": {"system": f"{SYSTEM}:{kind}-pseudonym", "value": record[column]}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": code,
                         "display": display},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                         "code": "1" if kind == "patient" else "4"},
            })

    outcome = record.get("outcome") or "error"
    return {
        "resourceType": "AuditEvent",
        "id": str(record["id"]),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": f"{SYSTEM}:operation", "code": record.get("operation") or "unknown"}],
        "action": "E",
        "recorded": recorded,
        "outcome": OUTCOME_CODES.get(outcome, "8"),
        "outcomeDesc": f"{outcome}: HTTP {record.get('http_status')}"
        + (f" {record['error_code']}" if record.get("error_code") else ""),
        "agent": [agent],
        "source": {"site": "medserve", "observer": {"display": "medserve gateway"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": entities,
    }


def bundle(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": _timestamp(utcnow()),
        "entry": [{"fullUrl": f"urn:uuid:{record['id']}", "resource": audit_event(record)} for record in records],
    }

"""Schemathesis hooks for the gateway's OpenAPI runs (SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py).

Schemathesis has no serializer for ``multipart/related`` (a DICOM series
upload to ``POST /v1/pipelines/{name}/studies``). The document declares that
body as binary, so it is sent as the bytes drawn, under the declared content
type; the gateway answers that with its documented errors (an unknown
pipeline, a malformed multipart body). Building valid series uploads is the
job of tests/unit/test_series.py and tests/unit/test_pipeline_route.py, which
fuzz the parser directly.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("multipart/related")
def _series_upload(_ctx: Any, value: Any) -> bytes:
    return serialize_binary(value)

"""JSON answers serialised with orjson: the hot routes' bodies and every error body.

Starlette's JSONResponse runs ``json.dumps``; the profile of the gateway's
request path ranked that encoder among its largest own costs, and orjson does
the same work several times faster with the same output (UTF-8, compact;
NaN and infinities become null instead of raising).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse

_OPTIONS = orjson.OPT_NON_STR_KEYS


class JSONAnswer(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def dumps(content: Any) -> bytes:
    """One JSON document as bytes (server-sent events, bodies built by hand)."""
    return orjson.dumps(content, option=_OPTIONS)

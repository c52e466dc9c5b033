"""JSON answers serialised with orjson: the hot routes' bodies and every error body.

Starlette's JSONResponse runs ``json.dumps``; the profile of the gateway's
request path ranked that encoder among its largest own costs, and orjson does
the same work several times faster with the same output (UTF-8, compact;
NaN and infinities become null instead of raising).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

_OPTIONS = orjson.OPT_NON_STR_KEYS
_FRAMING = frozenset({"content-type", "content-length"})


class JSONAnswer(JSONResponse):
    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        *,
        raw_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """``raw_headers``: more headers, already as (lower-case name, latin-1 value) byte pairs, as the
        hot routes' provenance headers come (``state.provenance_raw_headers``)."""
        # Starlette's Response.__init__ builds the raw header list through a
        # MutableHeaders pass and a Content-Type charset check; every hot answer
        # has the same two framing headers, so they are written directly.
        if headers and any(name.lower() in _FRAMING for name in headers):
            super().__init__(content, status_code, headers, media_type, background)  # framed by the caller
        else:
            self.status_code = status_code
            if media_type is not None:
                self.media_type = media_type
            self.background = background
            self.body = body = orjson.dumps(content, option=_OPTIONS)
            self.raw_headers = [(b"content-length", str(len(body)).encode()),
                                (b"content-type", (media_type or "application/json").encode("latin-1")),
                                *((name.lower().encode("latin-1"), value.encode("latin-1"))
                                  for name, value in (headers or {}).items())]
        if raw_headers:
            self.raw_headers += raw_headers

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def dumps(content: Any) -> bytes:
    """One JSON document as bytes (server-sent events, bodies built by hand)."""
    return orjson.dumps(content, option=_OPTIONS)

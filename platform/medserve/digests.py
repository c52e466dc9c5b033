"""The one sha256 helper for what audit records carry: input, output and reasoning digests.

The gateway digests request bodies and answers, the engines digest their
findings; both must hash the same bytes the same way, so they share this.
"""

from __future__ import annotations

import hashlib


def sha256_hex(data: bytes | str) -> str:
    """Lower-case hex sha256 of bytes, or of a string's UTF-8 encoding."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()

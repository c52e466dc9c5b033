"""multipart/related bodies as DICOMweb STOW-RS sends them: one part per DICOM instance.

    Content-Type: multipart/related; type="application/dicom"; boundary=BOUNDARY

Parts of type application/dicom are instances; at most one part of type
application/json carries request options (regions of interest). A part with
no Content-Type takes the root ``type`` parameter. The parser is strict and
bounded: the body size is limited before it is read (the gateway's
max_body_bytes), the number of parts and the size of each part's headers are
capped, and anything malformed is a 400 ``invalid_multipart``.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from medserve.errors import InvalidMultipartError, PayloadTooLargeError, UnsupportedMediaTypeError

DICOM = "application/dicom"
JSON = "application/json"
PART_TYPES = (DICOM, JSON)
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_JSON_PART_BYTES = 64 * 1024


@dataclass(frozen=True)
class Part:
    content_type: str
    data: bytes


@dataclass(frozen=True)
class SeriesUpload:
    instances: list[bytes]
    options: bytes | None  # the application/json part, when sent


def _params(content_type: str) -> tuple[str, str | None, str | None]:
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    root_type = message.get_param("type")
    return message.get_content_type(), boundary if isinstance(boundary, str) else None, (
        root_type.lower() if isinstance(root_type, str) else None
    )


def _part_type(header_block: bytes, default: str) -> str:
    if len(header_block) > MAX_PART_HEADER_BYTES:
        raise InvalidMultipartError("a part's headers are too long")
    content_type = default
    for raw in header_block.split(b"\r\n"):
        if not raw:
            continue
        name, colon, value = raw.partition(b":")
        if not colon or not name.strip():
            raise InvalidMultipartError("a part header is malformed")
        if name.strip().lower() == b"content-type":
            content_type = value.decode("latin-1").split(";")[0].strip().lower()
    return content_type


def parse_multipart_related(body: bytes, content_type: str, *, max_parts: int) -> list[Part]:
    media_type, boundary, root_type = _params(content_type)
    if media_type != "multipart/related":
        raise UnsupportedMediaTypeError(accepted=['multipart/related; type="application/dicom"'])
    if root_type not in (None, DICOM):
        raise UnsupportedMediaTypeError(accepted=['multipart/related; type="application/dicom"'])
    if not boundary or len(boundary) > 70:
        raise InvalidMultipartError("the multipart boundary is missing or longer than 70 characters")
    delimiter = b"--" + boundary.encode("latin-1")
    position = body.find(delimiter)
    if position < 0 or (position > 0 and body[position - 2:position] != b"\r\n"):
        raise InvalidMultipartError("the body holds no multipart delimiter")
    position += len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):
            break  # close delimiter; an epilogue after it is ignored (RFC 2046)
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise InvalidMultipartError("a multipart delimiter is not followed by a line break")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise InvalidMultipartError("the multipart body is not terminated")
        if len(parts) >= max_parts:
            raise PayloadTooLargeError("the upload has too many parts", max_parts=max_parts)
        if body.startswith(b"\r\n", start):  # no headers
            headers, data_start = b"", start + 2
        else:
            header_end = body.find(b"\r\n\r\n", start, end)
            if header_end < 0:
                raise InvalidMultipartError("a part has no blank line after its headers")
            headers, data_start = body[start:header_end], header_end + 4
        parts.append(Part(_part_type(headers, root_type or DICOM), body[data_start:end]))
        position = end + 2 + len(delimiter)
    return parts


def parse_series_upload(body: bytes, content_type: str, *, max_instances: int) -> SeriesUpload:
    """The DICOM instances and the optional JSON options of a STOW-RS style upload."""
    parts = parse_multipart_related(body, content_type, max_parts=max_instances + 1)
    instances, options = [], None
    for part in parts:
        if part.content_type == DICOM:
            instances.append(part.data)
        elif part.content_type == JSON:
            if options is not None:
                raise InvalidMultipartError("at most one application/json part is accepted")
            if len(part.data) > MAX_JSON_PART_BYTES:
                raise PayloadTooLargeError("the application/json part is too large", limit_bytes=MAX_JSON_PART_BYTES)
            options = part.data
        else:
            raise UnsupportedMediaTypeError("a part has a content type that is not accepted", accepted=list(PART_TYPES))
    if not instances:
        raise InvalidMultipartError("the upload holds no application/dicom part")
    if len(instances) > max_instances:
        raise PayloadTooLargeError("the upload has too many instances", max_instances=max_instances)
    return SeriesUpload(instances=instances, options=options)


def encode_multipart_related(parts: list[tuple[str, bytes]], boundary: str) -> tuple[bytes, str]:
    """Build a body and its Content-Type (for clients and tests)."""
    chunks = []
    for content_type, data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{DICOM}"; boundary={boundary}'

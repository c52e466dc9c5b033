"""Decode one DICOM instance or PNG into a 2-D image in display range [0, 1].

Every failure becomes InvalidDicomError / InvalidImageError with a stable code:
a malformed upload must cost the caller a 400, never the replica.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from medserve.errors import InvalidDicomError, InvalidImageError, MedserveError, PayloadTooLargeError

# Refuse images whose decoded size would be absurd before allocating them
# (defaults; replicas pass MEDSERVE_MAX_IMAGE_PIXELS / MEDSERVE_MAX_IMAGE_SIDE).
MAX_PIXELS = 8192 * 8192
MAX_SIDE = 16384


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MAX_PIXELS
    max_side: int = MAX_SIDE

    def check(self, rows: int, columns: int) -> None:
        if rows * columns > self.max_pixels or rows > self.max_side or columns > self.max_side:
            raise PayloadTooLargeError("the image is larger than allowed", rows=rows, columns=columns)


DEFAULT_LIMITS = ImageLimits()

# pydicom logs invalid element values verbatim (a malformed PatientName would
# land in the replica's log): keep only its critical messages.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class DecodedImage:
    """A single 2-D image scaled to [0, 1] for display, with what DICOM said about it."""

    pixels: np.ndarray  # float32, shape (rows, columns) or (rows, columns, 3) for colour
    modality: str | None
    body_part: str | None
    source_format: str  # "dicom" | "png"


def _window(values: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """Map stored values to [0, 1] using the DICOM window, or the value range when none is given."""
    if center is not None and width is not None and width > 1:
        low = center - 0.5 - (width - 1) / 2
        high = center - 0.5 + (width - 1) / 2
    else:
        low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _first_number(value: object) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
            value = list(value)[0]  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom_dataset(body: bytes, **error_details: object):  # type: ignore[no-untyped-def]
    """Parse one DICOM instance from untrusted bytes, fully, or raise InvalidDicomError.

    A parser fed hostile bytes can fail in any way (pydicom raises struct.error,
    BytesLengthException, RecursionError, ... — the hypothesis tests keep finding
    new ones), and pydicom defers converting element values until they are read.
    So every failure counts as "not a readable DICOM", and the elements medserve
    reads are converted here, inside the guard, rather than later by the caller.
    """
    import pydicom

    if not body:
        raise InvalidDicomError("a DICOM body is empty", **error_details)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(body))
            for element in dataset.iterall():  # force deferred value conversion now
                element.value  # noqa: B018
    except MedserveError:
        raise
    except Exception:  # noqa: BLE001 - see the docstring: any parser failure is invalid input
        raise InvalidDicomError(**error_details) from None
    return dataset


def decode_dicom(body: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    dataset = read_dicom_dataset(body)
    if "PixelData" not in dataset:
        raise InvalidDicomError("the DICOM instance carries no pixel data")
    rows, columns = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise InvalidDicomError("the DICOM instance has no image dimensions")
    limits.check(rows, columns)
    frames = _first_number(getattr(dataset, "NumberOfFrames", None)) or 1
    if frames > 1 and rows * columns * frames > limits.max_pixels * 4:
        raise PayloadTooLargeError("the image has too many frames", frames=int(frames))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = dataset.pixel_array
    except Exception:  # pydicom raises many types for broken pixel data  # noqa: BLE001
        raise InvalidDicomError("the DICOM pixel data could not be decoded") from None

    stored = np.asarray(stored)
    if stored.ndim == 3 and stored.shape[-1] != 3:
        stored = stored[stored.shape[0] // 2]  # multi-frame: take the middle frame
    if stored.ndim not in (2, 3) or stored.size == 0:
        raise InvalidDicomError("the DICOM pixel data has an unsupported shape")

    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    if stored.ndim == 3:
        pixels = (stored.astype(np.float32) / max(float(stored.max()), 1.0)).clip(0, 1)
    else:
        slope = _first_number(getattr(dataset, "RescaleSlope", None)) or 1.0
        intercept = _first_number(getattr(dataset, "RescaleIntercept", None)) or 0.0
        values = stored.astype(np.float64) * slope + intercept
        if not np.all(np.isfinite(values)):
            raise InvalidDicomError("the DICOM pixel data is not finite after rescaling")
        pixels = _window(
            values,
            _first_number(getattr(dataset, "WindowCenter", None)),
            _first_number(getattr(dataset, "WindowWidth", None)),
        )
        if photometric == "MONOCHROME1":  # stored inverted: 0 is white
            pixels = 1.0 - pixels
    modality = str(getattr(dataset, "Modality", "") or "").upper() or None
    body_part = str(getattr(dataset, "BodyPartExamined", "") or "").upper() or None
    return DecodedImage(pixels=pixels, modality=modality, body_part=body_part, source_format="dicom")


def decode_png(body: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise InvalidImageError("the request body is empty")
    try:
        image = Image.open(io.BytesIO(body))
        if image.format != "PNG":
            raise InvalidImageError("only PNG images are accepted")
        limits.check(image.height, image.width)
        image.load()
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidImageError() from None
    return DecodedImage(pixels=rgb, modality=None, body_part=None, source_format="png")

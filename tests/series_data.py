"""DICOM series built from the files pydicom ships, for unit and integration tests.

CT_small.dcm is one 128 x 128 axial CT slice through a vertebra (contrast
recorded: ISOVUE300/100). A series is that slice copied N times with
ImagePositionPatient moved along the slice normal, InstanceNumber and
SOPInstanceUID made unique, and optionally a per-slice HU offset (stored
values shifted) so ordering and rescaling are observable.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medserve.imaging.multipart import encode_multipart_related

# In CT_small: a box inside the vertebral body's trabecular bone, and one in paraspinal muscle.
BONE_ROI = {"z": [0, 1], "y": [18, 30], "x": [52, 66]}
MUSCLE_ROI = {"z": [0, 1], "y": [80, 100], "x": [20, 50]}


def _dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def ct_series(
    slices: int = 4,
    *,
    spacing_mm: float = 2.5,
    contrast: bool = False,
    body_part: str | None = "ABDOMEN",
    hu_step: int = 0,
    shuffle: bool = True,
) -> list[bytes]:
    """A CT series as DICOM bytes in a scrambled upload order (slice k's HU shifted by k * hu_step)."""
    series_uid = generate_uid()
    source = _dataset("CT_small.dcm")
    normal = np.cross(np.array(source.ImageOrientationPatient[:3], float), np.array(source.ImageOrientationPatient[3:], float))
    origin = np.array(source.ImagePositionPatient, float)
    stored = source.pixel_array
    instances = []
    for k in range(slices):
        ds = _dataset("CT_small.dcm")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + normal * spacing_mm * k]
        ds.SliceThickness = spacing_mm
        ds.SpacingBetweenSlices = spacing_mm
        if not contrast and "ContrastBolusAgent" in ds:
            del ds.ContrastBolusAgent
        if body_part:
            ds.BodyPartExamined = body_part
        if hu_step:
            ds.PixelData = (stored.astype(np.int16) + np.int16(k * hu_step)).astype(stored.dtype).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        instances.append(buffer.getvalue())
    if shuffle:
        order = [instances[i] for i in _scramble(slices)]
        return order
    return instances


def _scramble(n: int) -> list[int]:
    # Deterministic non-identity permutation: odds descending, then evens ascending.
    return sorted(range(n), key=lambda i: (i % 2 == 0, -i if i % 2 else i))


def mr_instance() -> bytes:
    return Path(get_testdata_file("MR_small.dcm")).read_bytes()


def multipart(instances: list[bytes], options: bytes | None = None) -> tuple[bytes, str]:
    parts = [("application/dicom", body) for body in instances]
    if options is not None:
        parts.append(("application/json", options))
    return encode_multipart_related(parts, boundary=f"medserve-{uuid.uuid4().hex}")

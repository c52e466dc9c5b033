"""Assemble DICOM instances into one volume: ordered, in Hounsfield units, spacing kept.

Slices are ordered by ImagePositionPatient projected on the slice normal
(the cross product of the ImageOrientationPatient row and column directions),
which is correct for any patient orientation and gantry direction; without
positions, by InstanceNumber. Stored values become modality values with each
instance's own RescaleSlope/RescaleIntercept (Hounsfield units for CT).

Everything that cannot form one consistent series is refused with
InvalidDicomError / InvalidSeriesError (400) and a detail naming the instance
by its position in the upload, never by an identifier from the file.
The volume keeps no patient identifiers: only geometry and acquisition facts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medserve.errors import InvalidDicomError, InvalidRoiError, InvalidSeriesError, PayloadTooLargeError
from medserve.imaging.decode import MAX_PIXELS, DecodedImage, _first_number, _window, read_dicom_dataset

# 64 Mi voxels = 256 MiB of float32: a 512 x 512 x 256 CT fits.
MAX_VOXELS = 64 * 1024 * 1024
# Positions closer than this along the normal are the same slice (mm).
_SAME_POSITION_MM = 1e-3
_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Volume:
    """One series as a (slices, rows, columns) float32 array in modality units."""

    voxels: np.ndarray
    # (between slices, between rows, between columns) in mm; slice spacing is
    # None when neither positions nor SliceThickness/SpacingBetweenSlices say it.
    spacing_mm: tuple[float | None, float | None, float | None]
    modality: str | None
    body_part: str | None
    units: str  # "HU" for CT, "stored" otherwise
    ordered_by: str  # "position" | "instance_number" | "single"
    uniform_spacing: bool
    contrast: bool  # ContrastBolusAgent present on any instance
    window: tuple[float, float] | None  # centre, width of the middle slice
    monochrome1: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.voxels.shape)  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """What a report may say about the series (no identifiers)."""
        return {
            "instances": self.shape[0],
            "shape": list(self.shape),
            "spacing_mm": [None if s is None else round(s, 4) for s in self.spacing_mm],
            "modality": self.modality,
            "body_part": self.body_part,
            "units": self.units,
            "ordered_by": self.ordered_by,
            "uniform_spacing": self.uniform_spacing,
            "contrast": self.contrast,
        }

    def middle_slice_image(self) -> DecodedImage:
        """The middle slice windowed to [0, 1], as a single-instance upload would decode."""
        index = self.shape[0] // 2
        values = self.voxels[index].astype(np.float64)
        centre, width = self.window if self.window is not None else (None, None)
        pixels = _window(values, centre, width)
        if self.monochrome1:
            pixels = 1.0 - pixels
        return DecodedImage(pixels=pixels, modality=self.modality, body_part=self.body_part, source_format="dicom")


@dataclass(frozen=True)
class _Instance:
    index: int
    values: np.ndarray
    modality: str | None
    body_part: str | None
    series_uid: str | None
    sop_uid: str | None
    orientation: np.ndarray | None
    position: np.ndarray | None
    instance_number: int | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    spacing_between: float | None
    contrast: bool
    window: tuple[float, float] | None
    monochrome1: bool


def _numbers(value: Any, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        return None
    return numbers


def _read_instance(index: int, body: bytes) -> _Instance:
    dataset = read_dicom_dataset(body, instance=index)
    if "PixelData" not in dataset:
        raise InvalidDicomError("a DICOM instance carries no pixel data", instance=index)
    rows, columns = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise InvalidDicomError("a DICOM instance has no image dimensions", instance=index)
    if rows * columns > MAX_PIXELS:
        raise PayloadTooLargeError("an image has too many pixels", rows=rows, columns=columns, instance=index)
    if int(getattr(dataset, "SamplesPerPixel", 1) or 1) != 1:
        raise InvalidSeriesError("series analysis needs greyscale instances", instance=index)
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        raise InvalidSeriesError(
            "multi-frame instances are not accepted in a series upload; send one instance per slice", instance=index
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = np.asarray(dataset.pixel_array)
    except Exception:  # pydicom raises many types for broken pixel data  # noqa: BLE001
        raise InvalidDicomError("DICOM pixel data could not be decoded", instance=index) from None
    if stored.shape != (rows, columns):
        raise InvalidDicomError("DICOM pixel data has an unexpected shape", instance=index)
    slope = _first_number(getattr(dataset, "RescaleSlope", None))
    intercept = _first_number(getattr(dataset, "RescaleIntercept", None))
    values = stored.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    if not np.all(np.isfinite(values)):
        raise InvalidDicomError("DICOM pixel data is not finite after rescaling", instance=index)
    spacing = _numbers(getattr(dataset, "PixelSpacing", None), 2)
    if spacing is not None and np.any(spacing <= 0):
        spacing = None
    centre = _first_number(getattr(dataset, "WindowCenter", None))
    width = _first_number(getattr(dataset, "WindowWidth", None))
    number = getattr(dataset, "InstanceNumber", None)
    try:
        instance_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    thickness = _first_number(getattr(dataset, "SliceThickness", None))
    between = _first_number(getattr(dataset, "SpacingBetweenSlices", None))
    return _Instance(
        index=index,
        values=values.astype(np.float32),
        modality=str(getattr(dataset, "Modality", "") or "").upper() or None,
        body_part=str(getattr(dataset, "BodyPartExamined", "") or "").upper() or None,
        series_uid=str(getattr(dataset, "SeriesInstanceUID", "") or "") or None,
        sop_uid=str(getattr(dataset, "SOPInstanceUID", "") or "") or None,
        orientation=_numbers(getattr(dataset, "ImageOrientationPatient", None), 6),
        position=_numbers(getattr(dataset, "ImagePositionPatient", None), 3),
        instance_number=instance_number,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        slice_thickness=thickness if thickness and thickness > 0 else None,
        spacing_between=between if between and between > 0 else None,
        contrast=bool(str(getattr(dataset, "ContrastBolusAgent", "") or "").strip()),
        window=(centre, width) if centre is not None and width is not None else None,
        monochrome1=str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1",
    )


def _check_consistent(instances: list[_Instance]) -> None:
    first = instances[0]
    for item in instances[1:]:
        if item.values.shape != first.values.shape:
            raise InvalidSeriesError("instances differ in rows or columns", instance=item.index)
        if item.series_uid != first.series_uid:
            raise InvalidSeriesError("instances belong to different series", instance=item.index)
        if item.modality != first.modality:
            raise InvalidSeriesError("instances differ in modality", instance=item.index)
        if (item.pixel_spacing is None) != (first.pixel_spacing is None) or (
            item.pixel_spacing is not None
            and not np.allclose(item.pixel_spacing, first.pixel_spacing, atol=_SPACING_TOLERANCE)  # type: ignore[arg-type]
        ):
            raise InvalidSeriesError("instances differ in pixel spacing", instance=item.index)
        if (item.orientation is None) != (first.orientation is None) or (
            item.orientation is not None
            and not np.allclose(item.orientation, first.orientation, atol=_ORIENTATION_TOLERANCE)  # type: ignore[arg-type]
        ):
            raise InvalidSeriesError("instances differ in orientation", instance=item.index)
    sops = [item.sop_uid for item in instances if item.sop_uid]
    if len(sops) != len(set(sops)):
        raise InvalidSeriesError("the same instance (SOPInstanceUID) was sent twice")


def _slice_normal(orientation: np.ndarray) -> np.ndarray | None:
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return None
    return normal / length


def _order(instances: list[_Instance]) -> tuple[list[_Instance], str, float | None, bool]:
    """Instances in slice order, how they were ordered, slice spacing, whether it is uniform."""
    first = instances[0]
    fallback = first.spacing_between or first.slice_thickness
    if len(instances) == 1:
        return instances, "single", fallback, True
    normal = _slice_normal(first.orientation) if first.orientation is not None else None
    if normal is not None and all(item.position is not None for item in instances):
        keyed = sorted(instances, key=lambda item: float(np.dot(item.position, normal)))  # type: ignore[arg-type]
        along = np.array([float(np.dot(item.position, normal)) for item in keyed])  # type: ignore[arg-type]
        gaps = np.diff(along)
        if np.any(gaps < _SAME_POSITION_MM):
            raise InvalidSeriesError("two instances share a slice position")
        spacing = float(np.median(gaps))
        uniform = bool(np.all(np.abs(gaps - spacing) <= max(0.01 * spacing, _SPACING_TOLERANCE)))
        return keyed, "position", spacing, uniform
    numbers = [item.instance_number for item in instances]
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        return sorted(instances, key=lambda item: item.instance_number), "instance_number", fallback, True  # type: ignore[arg-type,return-value]
    raise InvalidSeriesError("the instances carry neither slice positions nor distinct instance numbers")


def assemble_series(bodies: list[bytes]) -> Volume:
    """One volume from the DICOM instances of one series, in any upload order."""
    if not bodies:
        raise InvalidSeriesError("the upload holds no DICOM instance")
    instances = [_read_instance(index, body) for index, body in enumerate(bodies)]
    rows, columns = instances[0].values.shape
    if rows * columns * len(instances) > MAX_VOXELS:
        raise PayloadTooLargeError("the series has too many voxels", limit_voxels=MAX_VOXELS)
    _check_consistent(instances)
    ordered, ordered_by, slice_spacing, uniform = _order(instances)
    voxels = np.stack([item.values for item in ordered]).astype(np.float32)
    first = ordered[0]
    row_spacing, column_spacing = first.pixel_spacing if first.pixel_spacing else (None, None)
    middle = ordered[len(ordered) // 2]
    return Volume(
        voxels=voxels,
        spacing_mm=(slice_spacing, row_spacing, column_spacing),
        modality=first.modality,
        body_part=first.body_part,
        units="HU" if first.modality == "CT" else "stored",
        ordered_by=ordered_by,
        uniform_spacing=uniform,
        contrast=any(item.contrast for item in ordered),
        window=middle.window,
        monochrome1=middle.monochrome1,
    )


# --- regions of interest ------------------------------------------------------


class RoiBox(BaseModel):
    """A box of voxels: half-open [start, stop) index ranges along slices (z), rows (y), columns (x)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    z: tuple[int, int] = Field(description="First slice and one past the last, in slice order (0 = first).")
    y: tuple[int, int] = Field(description="First row and one past the last.")
    x: tuple[int, int] = Field(description="First column and one past the last.")

    @model_validator(mode="after")
    def _ordered(self) -> "RoiBox":
        for axis in ("z", "y", "x"):
            start, stop = getattr(self, axis)
            if start < 0 or stop <= start:
                raise ValueError(f"{axis} must be [start, stop) with 0 <= start < stop")
        return self

    def check_within(self, shape: tuple[int, int, int], field: str = "roi") -> None:
        for axis, size in zip(("z", "y", "x"), shape):
            if getattr(self, axis)[1] > size:
                raise InvalidRoiError("the region of interest lies outside the series", field=field, axis=axis,
                                      size=size)

    def voxels(self, volume: Volume) -> np.ndarray:
        self.check_within(volume.shape)
        return volume.voxels[self.z[0]:self.z[1], self.y[0]:self.y[1], self.x[0]:self.x[1]]

    def as_dict(self) -> dict[str, list[int]]:
        return {"z": list(self.z), "y": list(self.y), "x": list(self.x)}

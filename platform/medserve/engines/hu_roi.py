"""hu_roi: a transparent, deterministic attenuation analyzer for CT series.

It measures the mean attenuation (Hounsfield units) in a box-shaped region of
interest and flags it below a configured threshold. Two catalog deployments
use it for opportunistic CT screening: trabecular bone (osteoporosis flag)
and liver (steatosis flag). There is no learned model and no weights file:
the "artifact" is the analyzer's parameter document (analyzer name, version
and every parameter, canonical JSON), and the spec pins its sha256, so any
change of threshold or default ROI is a new digest and must be a new version.

The region of interest comes with the request; without one, the documented
default is a fixed box placed at a configured fraction of the volume. That
default does no anatomy detection: it is right only for series framed the
way the parameters assume, which is why every finding says where its ROI
came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medserve.engines.base import VolumeEngine
from medserve.errors import InputConstraintError, InvalidRoiError
from medserve.imaging.series import RoiBox, Volume
from medserve.specs import DeploymentSpec

# Bump when the computation changes: the digest of every hu_roi spec changes with it
# (the parameter document, see medserve.engines.builtin, carries it).
ANALYZER_VERSION = "1"


class DefaultRoi(BaseModel):
    """A box of fixed physical size centred at fractions of the volume's extent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: tuple[float, float, float] = Field(
        description="Centre as fractions (0..1) of the slice, row and column extent, e.g. [0.5, 0.65, 0.5]."
    )
    size_mm: tuple[float, float, float] = Field(
        description="Extent along slices, rows and columns in mm (at least one voxel along each axis)."
    )


class HuRoiParameters(BaseModel):
    """The spec's model.parameters for engine hu_roi."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    finding_code: str = Field(min_length=1, description="Code of the finding, e.g. trabecular-bone-attenuation.")
    finding_display: str = Field(min_length=1, description="Human-readable name of the measurement.")
    flag_below_hu: float = Field(description="Flag the finding when the ROI mean is below this (HU).")
    flag_label: str = Field(min_length=1, description="Interpretation text when flagged.")
    no_flag_label: str = Field(min_length=1, description="Interpretation text when not flagged.")
    default_roi: DefaultRoi = Field(description="ROI used when the request brings none.")
    min_voxels: int = Field(default=20, ge=1, description="Fewest voxels an ROI must hold.")
    require_unenhanced: bool = Field(
        default=False, description="Refuse series with a ContrastBolusAgent (threshold valid on non-contrast CT only)."
    )


def default_roi(volume: Volume, roi: DefaultRoi) -> RoiBox:
    bounds = []
    for size, fraction, spacing, extent_mm in zip(volume.shape, roi.center, volume.spacing_mm, roi.size_mm):
        centre = int(round(min(max(fraction, 0.0), 1.0) * (size - 1)))
        half = 0 if not spacing else int(max(0.0, extent_mm / spacing - 1) // 2)
        start, stop = max(0, centre - half), min(size, centre + half + 1)
        bounds.append((start, stop))
    return RoiBox(z=bounds[0], y=bounds[1], x=bounds[2])


class HuRoiAnalyzer(VolumeEngine):
    def __init__(self, spec: DeploymentSpec, artifact_path: Path | None = None) -> None:
        super().__init__(spec, artifact_path or Path("."))
        self.parameters = HuRoiParameters.model_validate(spec.model.parameters)

    def analyze(self, volume: Volume, roi: RoiBox | None) -> list[dict[str, Any]]:
        params = self.parameters
        if volume.units != "HU":
            raise InputConstraintError("this analyzer measures Hounsfield units: CT series only",
                                       model=self.spec.model.name)
        if params.require_unenhanced and volume.contrast:
            raise InputConstraintError(
                "this analyzer's threshold holds for non-contrast CT; the series records a contrast agent",
                model=self.spec.model.name,
            )
        source = "request" if roi is not None else "default"
        box = roi if roi is not None else default_roi(volume, params.default_roi)
        values = box.voxels(volume).astype(np.float64)
        if values.size < params.min_voxels:
            raise InvalidRoiError("the region of interest holds too few voxels", minimum=params.min_voxels)
        mean = float(values.mean())
        flagged = mean < params.flag_below_hu
        size_mm = [
            None if spacing is None else round((stop - start) * spacing, 2)
            for (start, stop), spacing in zip((box.z, box.y, box.x), volume.spacing_mm)
        ]
        return [
            {
                "code": params.finding_code,
                "display": params.finding_display,
                "value": round(mean, 1),
                "unit": "HU",
                "flag": flagged,
                "interpretation": params.flag_label if flagged else params.no_flag_label,
                "details": {
                    "threshold_hu": params.flag_below_hu,
                    "sd_hu": round(float(values.std()), 1),
                    "median_hu": round(float(np.median(values)), 1),
                    "voxels": int(values.size),
                    "roi": {"source": source, **box.as_dict(), "size_mm": size_mm},
                },
            }
        ]

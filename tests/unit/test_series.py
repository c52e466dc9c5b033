"""DICOM series assembly, Hounsfield units, STOW-RS style multipart parsing (no Ray)."""

import io
import json

import numpy as np
import pydicom
import pytest

from medserve.errors import (
    InvalidDicomError,
    InvalidMultipartError,
    InvalidRoiError,
    InvalidSeriesError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from medserve.imaging.multipart import encode_multipart_related, parse_series_upload
from medserve.imaging.series import RoiBox, assemble_series
from tests.series_data import ct_series, mr_instance, multipart


def _edit(body: bytes, **changes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(body))
    for name, value in changes.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_slices_are_ordered_by_position_along_the_normal_in_hounsfield_units():
    volume = assemble_series(ct_series(5, spacing_mm=2.5, hu_step=10))
    assert volume.shape == (5, 128, 128)
    assert volume.ordered_by == "position" and volume.uniform_spacing
    assert volume.spacing_mm == pytest.approx((2.5, 0.661468, 0.661468))
    # Slice k was stored shifted by 10 * k; CT_small's intercept is -1024.
    centre = [float(volume.voxels[k, 64, 64]) for k in range(5)]
    assert np.diff(centre).tolist() == [10.0] * 4
    source = pydicom.dcmread(io.BytesIO(ct_series(1)[0]))
    assert centre[0] == float(source.pixel_array[64, 64]) * float(source.RescaleSlope) + float(source.RescaleIntercept)
    assert volume.units == "HU" and volume.modality == "CT" and volume.body_part == "ABDOMEN"


def test_instance_number_orders_slices_without_positions():
    shuffled = ct_series(4, hu_step=5)
    bodies = [_edit(body, ImagePositionPatient=None) for body in shuffled]
    volume = assemble_series(bodies)
    assert volume.ordered_by == "instance_number"
    assert np.diff(volume.voxels[:, 64, 64]).tolist() == [5.0] * 3
    assert volume.spacing_mm[0] == 2.5  # from SliceThickness


def test_gaps_are_reported_as_non_uniform_spacing():
    bodies = ct_series(4, shuffle=False)
    bodies = bodies[:2] + bodies[3:]
    volume = assemble_series(bodies)
    assert volume.shape[0] == 3 and not volume.uniform_spacing


def test_contrast_and_modality_are_carried():
    assert assemble_series(ct_series(2, contrast=True)).contrast
    mr = assemble_series([mr_instance()])
    assert mr.modality == "MR" and mr.units == "stored" and mr.ordered_by == "single"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda s: s + [s[0]], InvalidSeriesError),  # the same instance twice
        (lambda s: [s[0], _edit(s[1], ImagePositionPatient=pydicom.dcmread(io.BytesIO(s[0])).ImagePositionPatient)],
         InvalidSeriesError),  # two slices at one position
        (lambda s: [s[0], _edit(s[1], SeriesInstanceUID="1.2.3.4")], InvalidSeriesError),
        (lambda s: [s[0], _edit(s[1], Modality="MR")], InvalidSeriesError),
        (lambda s: [s[0], _edit(s[1], PixelSpacing=[0.5, 0.5])], InvalidSeriesError),
        (lambda s: [s[0], _edit(s[1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])], InvalidSeriesError),
        (lambda s: [s[0], b"\x00" * 132 + b"corrupt"], InvalidDicomError),
        (lambda s: [s[0], b""], InvalidDicomError),
        (lambda s: [], InvalidSeriesError),
    ],
)
def test_inconsistent_series_are_refused(make, error):
    with pytest.raises(error) as caught:
        assemble_series(make(ct_series(2, shuffle=False)))
    assert caught.value.http_status == 400


def test_errors_name_the_instance_by_upload_position_only():
    with pytest.raises(InvalidDicomError) as caught:
        assemble_series([ct_series(1)[0], b"DICM" * 10])
    assert caught.value.details == {"instance": 1}


def test_roi_box_is_checked_against_the_volume():
    volume = assemble_series(ct_series(2))
    assert RoiBox(z=(0, 2), y=(0, 4), x=(0, 4)).voxels(volume).shape == (2, 4, 4)
    with pytest.raises(InvalidRoiError):
        RoiBox(z=(0, 3), y=(0, 4), x=(0, 4)).voxels(volume)
    with pytest.raises(ValueError):
        RoiBox(z=(2, 1), y=(0, 4), x=(0, 4))


# --- multipart/related -----------------------------------------------------


def test_multipart_roundtrip_with_options_part():
    instances = ct_series(3)
    body, content_type = multipart(instances, options=b'{"rois": {}}')
    upload = parse_series_upload(body, content_type, max_instances=10)
    assert upload.instances == instances
    assert json.loads(upload.options) == {"rois": {}}


def test_part_without_content_type_takes_the_root_type():
    dicom = ct_series(1)[0]
    body = b"preamble\r\n--b1\r\n\r\n" + dicom + b"\r\n--b1--\r\nepilogue"
    upload = parse_series_upload(body, 'multipart/related; type="application/dicom"; boundary=b1', max_instances=2)
    assert upload.instances == [dicom]


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"--b1\r\n\r\nx\r\n--b1--", "application/dicom", UnsupportedMediaTypeError),
        (b"--b1\r\n\r\nx\r\n--b1--", 'multipart/related; type="image/png"; boundary=b1', UnsupportedMediaTypeError),
        (b"--b1\r\n\r\nx\r\n--b1--", "multipart/related", InvalidMultipartError),  # no boundary
        (b"no delimiter here", "multipart/related; boundary=b1", InvalidMultipartError),
        (b"--b1\r\n\r\nx", "multipart/related; boundary=b1", InvalidMultipartError),  # not terminated
        (b"--b1\r\nContent-Type application/dicom\r\n\r\nx\r\n--b1--", "multipart/related; boundary=b1",
         InvalidMultipartError),
        (b"--b1\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1--", "multipart/related; boundary=b1",
         UnsupportedMediaTypeError),
        (b"--b1\r\nContent-Type: application/json\r\n\r\n{}\r\n--b1--", "multipart/related; boundary=b1",
         InvalidMultipartError),  # no DICOM part
        (b"--b1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\nx\r\n--b1--", "multipart/related; boundary=b1",
         InvalidMultipartError),  # oversized part headers
    ],
)
def test_malformed_multipart_is_refused(body, content_type, error):
    with pytest.raises(error):
        parse_series_upload(body, content_type, max_instances=5)


def test_too_many_parts_is_413():
    body, content_type = encode_multipart_related([("application/dicom", b"x")] * 6, "b1")
    with pytest.raises(PayloadTooLargeError):
        parse_series_upload(body, content_type, max_instances=4)

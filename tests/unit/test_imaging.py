"""DICOM and PNG decoding on pydicom's real test files; corrupt input is a clean 400."""

import io

import numpy as np
import pytest
from PIL import Image

from medserve.errors import InvalidDicomError, InvalidImageError
from medserve.imaging.decode import decode_dicom, decode_png
from medserve.imaging.preprocess import to_model_input


def test_mr_small_decodes_with_modality(mr_small_path):
    image = decode_dicom(mr_small_path.read_bytes())
    assert image.modality == "MR"
    assert image.pixels.shape == (64, 64)
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0


def test_ct_small_uses_rescale_and_window(ct_small_path):
    image = decode_dicom(ct_small_path.read_bytes())
    assert image.modality == "CT"
    assert image.pixels.dtype == np.float32
    assert image.pixels.max() <= 1.0


@pytest.mark.parametrize(
    "body",
    [b"", b"not a dicom file", b"\x00" * 128 + b"DICM" + b"\xff" * 64],
)
def test_corrupt_dicom_is_invalid_dicom(body):
    with pytest.raises(InvalidDicomError):
        decode_dicom(body)


def test_truncated_dicom_is_invalid_dicom(mr_small_path):
    data = mr_small_path.read_bytes()
    with pytest.raises(InvalidDicomError):
        decode_dicom(data[: len(data) // 2])


def test_png_roundtrip_and_model_input_shape():
    buffer = io.BytesIO()
    Image.fromarray(np.arange(100 * 80, dtype=np.uint32).reshape(100, 80).astype(np.uint8)).save(buffer, "PNG")
    image = decode_png(buffer.getvalue())
    assert image.pixels.shape == (100, 80, 3)
    batch = to_model_input(image, 240, 240, 3)
    assert batch.shape == (1, 240, 240, 3) and batch.dtype == np.float32


def test_jpeg_is_not_accepted_as_png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    with pytest.raises(InvalidImageError):
        decode_png(buffer.getvalue())


def test_grey_dicom_becomes_three_channel_input(mr_small_path):
    batch = to_model_input(decode_dicom(mr_small_path.read_bytes()), 240, 240, 3)
    assert batch.shape == (1, 240, 240, 3)
    assert np.allclose(batch[..., 0], batch[..., 1])

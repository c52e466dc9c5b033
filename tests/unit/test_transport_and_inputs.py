"""TLS on the gateway, configurable image limits, and corrupt DICOM files that must never crash decoding."""

from __future__ import annotations

import datetime
import io
import ssl

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings, strategies as st

from medserve.controlplane.render import RenderOptions, render_serve_config
from medserve.errors import InvalidDicomError, InvalidImageError, PayloadTooLargeError
from medserve.imaging.decode import ImageLimits, decode_dicom, decode_png
from medserve.settings import Settings


def self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medserve.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gateway.crt", tmp_path / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_files_reach_serves_http_options(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("MEDSERVE_TLS_CERT_FILE", cert)
    monkeypatch.setenv("MEDSERVE_TLS_KEY_FILE", key)
    options = RenderOptions.from_settings(Settings())
    http = render_serve_config([], options)["http_options"]
    assert (http["ssl_certfile"], http["ssl_keyfile"]) == (cert, key)
    # The pair is a usable server certificate (what uvicorn inside Serve's proxy will load).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    assert "ssl_certfile" not in render_serve_config([], RenderOptions())["http_options"]


def test_tls_needs_both_files(tmp_path):
    cert, _ = self_signed(tmp_path)
    with pytest.raises(ValueError):
        Settings(tls_cert_file=cert)


def test_image_dimension_limits_are_configurable(mr_small_path):
    body = mr_small_path.read_bytes()  # 64 x 64
    assert decode_dicom(body).pixels.shape == (64, 64)
    with pytest.raises(PayloadTooLargeError):
        decode_dicom(body, ImageLimits(max_pixels=64 * 63))
    with pytest.raises(PayloadTooLargeError):
        decode_dicom(body, ImageLimits(max_side=32))
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 10), dtype=np.uint8)).save(png, format="PNG")
    assert decode_png(png.getvalue(), ImageLimits(max_side=40)).pixels.shape == (40, 10, 3)
    with pytest.raises(PayloadTooLargeError):
        decode_png(png.getvalue(), ImageLimits(max_side=39))


def _testdata(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return open(get_testdata_file(name), "rb").read()


SAMPLES = {name: _testdata(name) for name in ("MR_small.dcm", "CT_small.dcm", "rtdose.dcm", "JPEG2000.dcm")}
ALLOWED = (InvalidDicomError, InvalidImageError, PayloadTooLargeError)


def _decode_or_refuse(body: bytes) -> None:
    try:
        image = decode_dicom(body, ImageLimits(max_pixels=4096 * 4096))
    except ALLOWED:
        return
    assert image.pixels.dtype == np.float32 and np.all(np.isfinite(image.pixels))


mutation = st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SAMPLES)), cut=st.floats(0.0, 1.0), mutations=st.lists(mutation, max_size=6))
def test_mutated_and_truncated_real_dicom_files_never_crash_decoding(name, cut, mutations):
    data = bytearray(SAMPLES[name])
    for offset, patch in mutations:
        start = offset % len(data)
        data[start:start + len(patch)] = patch
    _decode_or_refuse(bytes(data[: max(1, int(len(data) * cut))]) if cut < 1.0 else bytes(data))


@settings(max_examples=60, deadline=None)
@given(header_bytes=st.binary(min_size=0, max_size=400))
def test_random_bytes_after_a_dicom_preamble_are_refused_cleanly(header_bytes):
    _decode_or_refuse(b"\0" * 128 + b"DICM" + header_bytes)


@pytest.mark.parametrize("tag", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"])
@pytest.mark.parametrize("value", [0, 1, 65535])
def test_lying_image_attributes_are_refused_cleanly(tag, value):
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(SAMPLES["MR_small.dcm"]))
    setattr(dataset, tag, value)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    _decode_or_refuse(out.getvalue())

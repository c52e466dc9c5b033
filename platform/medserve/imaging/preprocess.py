"""Turn a decoded image into the tensor a classifier expects."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medserve.imaging.decode import DecodedImage


def to_model_input(image: DecodedImage, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A float32 NHWC batch of one, values in [0, 1], resized with bicubic interpolation.

    Matches how the reference classifiers were trained: an 8-bit RGB image
    resized and divided by 255. Grey images are replicated across channels.
    """
    pixels = image.pixels
    as_bytes = np.round(pixels * 255.0).astype(np.uint8)
    # uint8 (rows, cols) reads as mode L, (rows, cols, 3) as RGB.
    resized = Image.fromarray(as_bytes).resize((width, height), Image.Resampling.BICUBIC)
    if channels == 3:
        resized = resized.convert("RGB")
    elif channels == 1:
        resized = resized.convert("L")
    array = np.asarray(resized, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return array[None, ...]

"""What every decoder shares: the error type of unusable images, the size limit, and grey 8-bit
conversion. A module of its own so that etl/images.py (PNG, JPEG) and etl/dicom_images.py both
import it without importing each other."""
from __future__ import annotations

import numpy as np
from PIL import Image

# Refuse images larger than this many pixels before decoding them (decompression bombs).
# The largest real chest radiographs are about 4,300 x 3,500 pixels.
MAX_PIXELS = 40_000_000

SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")


class ImageError(ValueError):
    """An image that cannot become a training row; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def stretch_to_u8(values: np.ndarray) -> np.ndarray:
    """Min..max of any numeric array to 0..255 uint8 (all-equal values give zeros)."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def to_grey_u8(image: Image.Image) -> np.ndarray:
    """Grey 8-bit pixels of any Pillow image.

    RGB(A)/palette images are converted with ITU-R 601 luma (alpha dropped); images of more
    than 8 bits (16-bit PNG, float TIFF) are stretched min..max to 0..255, because their
    stored range (often 12 bits in a 16-bit container) says nothing about the display range.
    """
    if image.mode in (*SIXTEEN_BIT_GREY, "F"):
        return stretch_to_u8(np.asarray(image, dtype=np.float32))
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)

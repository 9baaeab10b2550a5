"""Decode, convert to grey 8-bit, resize and normalise one radiograph. Pure Pillow + numpy."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Refuse images larger than this many pixels before decoding them (decompression bombs).
# The largest real chest radiographs are about 4,300 x 3,500 pixels.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image that cannot become a training row; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def to_grey_u8(image: Image.Image) -> np.ndarray:
    """Grey 8-bit pixels of any Pillow image.

    RGB(A)/palette images are converted with ITU-R 601 luma (alpha dropped); images of more
    than 8 bits (16-bit PNG, float TIFF) are stretched min..max to 0..255, because their
    stored range (often 12 bits in a 16-bit container) says nothing about the display range.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def decode_resize(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size) grey uint8, or ImageError with the reason."""
    if not data:
        raise ImageError("empty_file", "file has zero bytes")
    if data[128:132] == b"DICM":  # DICOM Part 10: its window and photometry need pydicom
        from etl.dicom_images import decode_resize_dicom
        return decode_resize_dicom(data, size)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises several types for unreadable headers
        raise ImageError("not_an_image", str(exc)) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError("too_many_pixels", f"{width}x{height} exceeds {MAX_PIXELS} pixels")
    if image.format == "JPEG":
        image.draft("L", (size, size))  # DCT-domain downscale: decodes far fewer pixels
    try:
        image.load()
    except Exception as exc:
        raise ImageError("undecodable", f"{image.format} data is truncated or corrupt: {exc}") from exc
    grey = Image.fromarray(to_grey_u8(image))
    if grey.size != (size, size):
        # reducing_gap: box-reduce by an integer factor first, then bilinear; much faster
        # than a full-resolution filter and visually the same at these ratios.
        grey = grey.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey, dtype=np.uint8)


def normalise(grey_u8: np.ndarray, mean, std) -> np.ndarray:
    """(..., H, W) uint8 -> (..., C, H, W) float32: scale to 0..1, repeat to len(mean) channels,
    subtract mean and divide by std per channel."""
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    scaled = grey_u8.astype(np.float32)[..., None, :, :] / 255.0
    return (scaled - mean) / std

"""Decode, convert to grey 8-bit, resize and normalise one radiograph. Pillow or OpenCV + numpy.

Two decoders give the same grey pixels before resizing and differ only in the resize filter:

- "opencv" (the default when `cv2` imports: `pip install opencv-python-headless==4.11.*`, the
  last release that runs on numpy < 2): `cv2.imdecode` for 8-bit grey/RGB/RGBA and 16-bit grey
  PNGs and for grey/RGB JPEGs, then an area resize (`cv2.INTER_AREA`; a box filter, exact for
  integer ratios) when the image shrinks, bilinear when it grows. Colour is converted to grey by
  Pillow's own "L" conversion, and JPEGs are decoded to luma at Pillow's DCT scale, so the
  pixels before resizing are identical to the Pillow decoder's (tested on the real data).
- "pillow" (the fallback, and the only decoder before OpenCV was added): Pillow's decoders,
  then Pillow's bilinear resize (a triangle filter widened to the reduction ratio) after an
  integer box reduction (`reducing_gap=2`).

Choose with `decode_resize(..., decoder="pillow")` or the CXR_DECODER environment variable
(auto | pillow | opencv). Other formats and modes (palette, 1-bit, CMYK, 16-bit colour, TIFF,
...) always take the Pillow path, as does anything OpenCV fails to decode, so corrupt input
raises the same ImageError, word for word, whichever decoder is chosen. DICOM has its own path
(etl/dicom_images.py).

Measured difference |opencv - pillow| (`python -m benchmarks.decode`; OpenCV 4.11.0.86, Pillow 13.0):
  100 real NIH PNGs (1024 px, 6 RGBA) -> 512 px: mean 0.48 grey levels (worst image 0.78), 4.2% of
    pixels more than 1 apart (worst image 11%), 99.9th percentile 16, max 65;
  -> 224 px: mean 0.39 (worst image 0.73), 3.7% more than 1 apart (worst image 12%), p99.9 12, max 48;
  200 pneumonia JPEGs (224 px) at 224: identical; -> 192 px: mean 0.25, 0.8% > 1, max 17;
    -> 512 px (both bilinear): at most 1.
So the paths are not within +-1 grey level after a reduction: a box filter and a widened triangle
weigh neighbouring pixels differently and part where intensity jumps (at 512 px, 79% of the
pixels more than 8 apart are on the steepest 5% of edges, 60% within 16 px of the border).
tests/test_images.py holds them, per image, to a mean under 1 grey level and under 15% of pixels
more than 1 apart, and to identical pixels where nothing is resized. A dataset's pixels thus
depend on the decoder that built it: score a model with the decoder its training data was made
with (CXR_DECODER=pillow reproduces datasets made before OpenCV was added).
Speed, same run, one core: OpenCV gives 1.11-1.19x Pillow's images/s at 224 px and 1.29-1.34x at
512 px: PNG inflate is most of both; the gain is mostly the cheaper resize (decoding alone: 7%).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from cxr_pipeline.etl.dicom_images import decode_resize_dicom, is_dicom
from cxr_pipeline.etl.pixels import MAX_PIXELS, SIXTEEN_BIT_GREY, ImageError, stretch_to_u8, to_grey_u8

try:
    import cv2
    CV2_MISSING = ""
except Exception as exc:  # not installed, or a build for numpy 2 failing on numpy 1
    cv2 = None
    CV2_MISSING = f"{type(exc).__name__}: {exc}"

DECODER_ENV = "CXR_DECODER"
DECODERS = ("pillow", "opencv")
# PNG and JPEG modes (as Pillow reads the header) that OpenCV decodes to the same pixels
OPENCV_MODES = {"PNG": ("L", "RGB", "RGBA", *SIXTEEN_BIT_GREY), "JPEG": ("L", "RGB")}


class DecoderChoiceError(RuntimeError):
    """A decoder that cannot be used here. A RuntimeError on purpose: the ETL quarantines rows that
    raise ValueError or OSError, and a wrong setting must stop the job, not quarantine every row."""


def choose_decoder(decoder: str | None = None) -> str:
    """"pillow" or "opencv": `decoder`, else $CXR_DECODER, else "auto" (opencv when cv2 imports)."""
    requested = (decoder or os.environ.get(DECODER_ENV) or "auto").strip().lower()
    if requested == "auto":
        return "opencv" if cv2 is not None else "pillow"
    if requested not in DECODERS:
        source = "decoder argument" if decoder else f"{DECODER_ENV}={requested!r}"
        raise DecoderChoiceError(f"unknown image decoder in {source}: use auto, pillow or opencv")
    if requested == "opencv" and cv2 is None:
        raise DecoderChoiceError(f"the opencv decoder was asked for but cv2 does not import ({CV2_MISSING}); "
                                 f"pip install opencv-python-headless==4.11.* or set {DECODER_ENV}=pillow")
    return requested


def open_checked(data: bytes) -> Image.Image:
    """The Pillow image of `data` with only its header read, or ImageError (not_an_image, too_many_pixels)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises several types for unreadable headers
        raise ImageError("not_an_image", str(exc)) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError("too_many_pixels", f"{width}x{height} exceeds {MAX_PIXELS} pixels")
    return image


def jpeg_scale(image_size: tuple[int, int], size: int) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) Pillow's draft() picks for a JPEG shown at `size`."""
    fits = min(image_size[0] // size, image_size[1] // size)
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def decode_grey_opencv(data: bytes, image: Image.Image, size: int) -> np.ndarray | None:
    """Grey uint8 pixels, identical to the Pillow path's before resizing, or None where OpenCV
    would not give those (another format or mode, or a decoding failure): the caller uses Pillow."""
    if image.mode not in OPENCV_MODES.get(image.format, ()):
        return None
    width, height = image.size
    if image.format == "JPEG":  # luma only, at the DCT scale Pillow's draft() picks
        scale = jpeg_scale(image.size, size)
        flags = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[scale]
        flags |= cv2.IMREAD_IGNORE_ORIENTATION  # Pillow does not apply EXIF rotation either
        width, height = (width + scale - 1) // scale, (height + scale - 1) // scale
    else:  # as stored: 16 bits kept, colour converted below by Pillow's own formula
        flags = cv2.IMREAD_UNCHANGED
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    if pixels is None or pixels.shape[:2] != (height, width):
        return None
    if pixels.dtype == np.uint8 and pixels.ndim == 2:
        return pixels
    if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        # BGR(A) -> Pillow "L" (ITU-R 601-2 in fixed point, rounded): cv2.cvtColor rounds differently
        rgb = Image.frombuffer("RGB", (width, height), pixels, "raw", "BGR" if pixels.shape[2] == 3 else "BGRX", 0, 1)
        return np.asarray(rgb.convert("L"), dtype=np.uint8)
    if pixels.dtype == np.uint16 and pixels.ndim == 2 and image.mode in SIXTEEN_BIT_GREY:
        return stretch_to_u8(pixels)
    return None  # e.g. a 16-bit colour PNG, which Pillow reads as 8 bits


def resize_opencv(grey: np.ndarray, size: int) -> np.ndarray:
    """(size, size): an axis that shrinks gets an area resize, one that grows bilinear (where
    Pillow's filter is bilinear too: within 1 grey level of it on the pneumonia JPEGs)."""
    height, width = grey.shape
    if width > size or height > size:
        target_width, target_height = min(width, size), min(height, size)
        # Like Pillow's reducing_gap=2: first reduce by an integer factor (OpenCV's fast path for
        # integer ratios), then area to the final size: 1024 -> 224 takes half the time of one step.
        factor_x, factor_y = max(width // (2 * size), 1), max(height // (2 * size), 1)
        if factor_x > 1 or factor_y > 1:
            grey = cv2.resize(grey, (width // factor_x, height // factor_y), interpolation=cv2.INTER_AREA)
        grey = cv2.resize(grey, (target_width, target_height), interpolation=cv2.INTER_AREA)
    if grey.shape != (size, size):
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_LINEAR)
    return grey


def decode_resize_pillow(image: Image.Image, size: int) -> np.ndarray:
    """The Pillow path: decode `image` (header already read), grey, bilinear resize."""
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


def decode_resize(data: bytes, size: int, decoder: str | None = None) -> np.ndarray:
    """Encoded image bytes -> (size, size) grey uint8, or ImageError with the reason.

    decoder: "pillow", "opencv" or "auto"; None reads $CXR_DECODER (default auto: opencv when
    cv2 imports). See the module docstring for how the two differ.
    """
    chosen = choose_decoder(decoder)
    if not data:
        raise ImageError("empty_file", "file has zero bytes")
    if is_dicom(data):  # DICOM Part 10: its window and photometry need pydicom
        return decode_resize_dicom(data, size)
    image = open_checked(data)
    if chosen == "opencv":
        grey = decode_grey_opencv(data, image, size)
        if grey is not None:
            return resize_opencv(grey, size)
    return decode_resize_pillow(image, size)


def normalise(grey_u8: np.ndarray, mean, std) -> np.ndarray:
    """(..., H, W) uint8 -> (..., C, H, W) float32: scale to 0..1, repeat to len(mean) channels,
    subtract mean and divide by std per channel."""
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    scaled = grey_u8.astype(np.float32)[..., None, :, :] / 255.0
    return (scaled - mean) / std

"""Decode one DICOM radiograph to display-ready grey 8-bit, the way a viewer shows it.

Stored values -> Modality LUT (rescale slope/intercept or LUT) -> VOI LUT (the window the
modality chose, or its VOI LUT table) -> 0..1 -> inverted for MONOCHROME1 (where the
stored minimum is white) -> 0..255. Without a window or VOI LUT the modality values are
stretched min..max, as etl/images.py does for other images of more than 8 bits.
Compressed transfer syntaxes are decoded by pydicom's plugins (JPEG 2000: pylibjpeg +
pylibjpeg-openjpeg). Pure pydicom + numpy + Pillow: no Spark.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from cxr_pipeline.etl.pixels import MAX_PIXELS, ImageError, to_grey_u8

DICM_OFFSET, DICM_MAGIC = 128, b"DICM"  # Part 10 files: a 128-byte preamble, then 'DICM'
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
DECODER_PACKAGES = "JPEG 2000: pylibjpeg pylibjpeg-openjpeg; JPEG-LS: pyjpegls; JPEG lossless: pylibjpeg-libjpeg"


def is_dicom(data: bytes) -> bool:
    return data[DICM_OFFSET:DICM_OFFSET + len(DICM_MAGIC)] == DICM_MAGIC


def read_dataset(data: bytes):
    """The pydicom Dataset of a Part 10 file, or ImageError('not_an_image')."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on truncation; judged below
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises several types for unreadable files
        raise ImageError("not_an_image", f"unreadable DICOM file: {exc}") from exc
    if "PixelData" not in ds and PIXEL_DATA_TAG in data:
        raise ImageError("undecodable", "the file ends inside its Pixel Data element (truncated copy?)")
    return ds


def stored_pixels(ds) -> np.ndarray:
    """The stored pixel values of a single-frame image; refuses oversized images before decoding."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise ImageError("not_an_image", "DICOM file has no Pixel Data element (not an image)")
    width, height = int(ds.Columns), int(ds.Rows)
    if width * height > MAX_PIXELS:
        raise ImageError("too_many_pixels", f"{width}x{height} exceeds {MAX_PIXELS} pixels")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageError("multi_frame", f"{frames} frames; a radiograph has one: export the frame to use as a file")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(syntax)
    except Exception as exc:  # NotImplementedError for syntaxes pydicom has no decoder for at all
        raise ImageError("unsupported_compression", f"no DICOM pixel decoder exists for transfer syntax {syntax}: "
                                                    f"{exc}") from exc
    if not decoder.is_available:
        raise ImageError("unsupported_compression",
                         f"no decoder installed for {syntax.name} ({syntax}); install its plugin ({DECODER_PACKAGES})")
    try:
        return ds.pixel_array
    except Exception as exc:
        raise ImageError("undecodable", f"DICOM {syntax.name} pixel data is truncated or corrupt: {exc}") from exc


def voi_to_unit(values: np.ndarray, ds) -> np.ndarray:
    """Modality values -> 0..1 through the dataset's VOI LUT or first window (PS3.3 C.11.2)."""
    from pydicom.pixels import apply_voi

    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(apply_voi(values, ds) / (2.0**bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(ds["WindowCenter"].value[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
        width = float(ds["WindowWidth"].value[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if function == "LINEAR" and width >= 1:  # LINEAR's half-pixel offsets, C.11.2.1.2.1
            center, width = center - 0.5, width - 1.0
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros(values.shape)


def display_u8(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored pixel values -> grey uint8 as a viewer displays them."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith(("RGB", "YBR")) and int(ds.BitsAllocated) == 8:  # colour captures: pydicom gives RGB
        return to_grey_u8(Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError("unsupported_photometric", f"{photometric} with {ds.BitsAllocated} bits is not a radiograph "
                                                    "this pipeline can display; convert it to MONOCHROME2")
    unit = voi_to_unit(apply_modality_lut(pixels, ds).astype(np.float64), ds)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.round(unit * 255.0).astype(np.uint8)


def dicom_to_grey_u8(data: bytes) -> np.ndarray:
    """DICOM Part 10 bytes -> (rows, columns) grey uint8 as displayed, or ImageError with the reason."""
    ds = read_dataset(data)
    pixels = stored_pixels(ds)
    try:
        return display_u8(pixels, ds)
    except ImageError:
        raise
    except Exception as exc:  # malformed LUT or window attributes
        raise ImageError("undecodable", f"DICOM Modality/VOI LUT attributes are unusable: {exc}") from exc


def decode_resize_dicom(data: bytes, size: int) -> np.ndarray:
    """DICOM bytes -> (size, size) grey uint8, resized like etl.images.decode_resize."""
    grey = Image.fromarray(dicom_to_grey_u8(data))
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey, dtype=np.uint8)

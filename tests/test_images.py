"""Decoding, grey conversion, resizing and normalisation on real and crafted images."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import NIH, require
from etl.images import MAX_PIXELS, ImageError, decode_resize, normalise, to_grey_u8

RGBA_NIH = ["00000100_000.png", "00001369_000.png", "00002578_000.png", "00004934_000.png",
            "00005224_000.png", "00005813_000.png"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", RGBA_NIH)
def test_real_rgba_nih_png_becomes_grey_of_its_colour_channels(name):
    data = (require(NIH / "images") / name).read_bytes()
    original = Image.open(io.BytesIO(data))
    assert original.mode == "RGBA"
    grey = decode_resize(data, 1024)
    assert grey.shape == (1024, 1024) and grey.dtype == np.uint8
    assert np.array_equal(grey, np.asarray(original.convert("RGB").convert("L")))


def test_real_grey_png_resized_to_each_report_size():
    data = (require(NIH / "images") / "00000075_000.png").read_bytes()
    for size in (224, 256, 512):
        grey = decode_resize(data, size)
        assert grey.shape == (size, size)
        assert 20 < grey.mean() < 235  # a radiograph, not a blank


def test_sixteen_bit_png_is_stretched_to_eight_bits():
    values = np.linspace(1000, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12 bits in 16
    grey = decode_resize(png_bytes(Image.fromarray(values)), 64)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey[:, 0].astype(int)) >= 0)  # order of intensities kept


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"this is a text file, not an image", "not_an_image"),
])
def test_unreadable_bytes_give_reason(data, reason):
    with pytest.raises(ImageError) as caught:
        decode_resize(data, 64)
    assert caught.value.reason == reason


def test_truncated_real_png_is_undecodable():
    data = (require(NIH / "images") / "00000075_000.png").read_bytes()
    with pytest.raises(ImageError) as caught:
        decode_resize(data[: len(data) // 2], 64)
    assert caught.value.reason == "undecodable"


def test_decompression_bomb_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    bomb = png_bytes(Image.new("L", (side, side)))  # a few kB that would decode to > MAX_PIXELS
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as caught:
        decode_resize(bomb, 64)
    assert caught.value.reason == "too_many_pixels"


def test_normalise_repeats_grey_to_three_channels_with_imagenet_constants():
    grey = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalise(grey, mean, std)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    for channel in range(3):
        expected = (grey / 255.0 - mean[channel]) / std[channel]
        np.testing.assert_allclose(out[channel], expected, rtol=1e-6)


def test_to_grey_keeps_l_images_unchanged():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_grey_u8(Image.fromarray(pixels)), pixels)

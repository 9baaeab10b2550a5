"""Decoding, grey conversion, resizing and normalisation on real and crafted images."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import KERMANY, NIH, ROOT, require
from cxr_pipeline.etl import images
from cxr_pipeline.etl.images import (MAX_PIXELS, DecoderChoiceError, ImageError, choose_decoder, decode_resize, normalise,
                                     to_grey_u8)

RGBA_NIH = ["00000100_000.png", "00001369_000.png", "00002578_000.png", "00004934_000.png",
            "00005224_000.png", "00005813_000.png"]
# a grey one, an RGBA one, and the one whose two resizes differ most (mean |diff| 0.78 at 512)
COMPARED_NIH = ["00000075_000.png", "00000100_000.png", "00000404_000.png"]
needs_cv2 = pytest.mark.skipif(images.cv2 is None, reason=f"cv2 does not import ({images.CV2_MISSING}): "
                               "pip install opencv-python-headless==4.11.* to test the OpenCV decoder")
DECODERS = ["pillow", pytest.param("opencv", marks=needs_cv2)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", RGBA_NIH)
def test_real_rgba_nih_png_becomes_grey_of_its_colour_channels(name, decoder):
    data = (require(NIH / "images") / name).read_bytes()
    original = Image.open(io.BytesIO(data))
    assert original.mode == "RGBA"
    grey = decode_resize(data, 1024, decoder)
    assert grey.shape == (1024, 1024) and grey.dtype == np.uint8
    assert np.array_equal(grey, np.asarray(original.convert("RGB").convert("L")))


@pytest.mark.parametrize("decoder", DECODERS)
def test_real_grey_png_resized_to_each_report_size(decoder):
    data = (require(NIH / "images") / "00000075_000.png").read_bytes()
    for size in (224, 256, 512):
        grey = decode_resize(data, size, decoder)
        assert grey.shape == (size, size)
        assert 20 < grey.mean() < 235  # a radiograph, not a blank


@pytest.mark.parametrize("decoder", DECODERS)
def test_sixteen_bit_png_is_stretched_to_eight_bits(decoder):
    values = np.linspace(1000, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12 bits in 16
    grey = decode_resize(png_bytes(Image.fromarray(values)), 64, decoder)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey[:, 0].astype(int)) >= 0)  # order of intensities kept


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"this is a text file, not an image", "not_an_image"),
])
def test_unreadable_bytes_give_reason(data, reason, decoder):
    with pytest.raises(ImageError) as caught:
        decode_resize(data, 64, decoder)
    assert caught.value.reason == reason


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_real_png_is_undecodable(decoder):
    data = (require(NIH / "images") / "00000075_000.png").read_bytes()
    with pytest.raises(ImageError) as caught:
        decode_resize(data[: len(data) // 2], 64, decoder)
    assert caught.value.reason == "undecodable"


@pytest.mark.parametrize("decoder", DECODERS)
def test_decompression_bomb_refused_before_decoding(decoder):
    side = int(MAX_PIXELS**0.5) + 100
    bomb = png_bytes(Image.new("L", (side, side)))  # a few kB that would decode to > MAX_PIXELS
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as caught:
        decode_resize(bomb, 64, decoder)
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


# --- the OpenCV decoder against the Pillow one (etl/images.py docstring: the measured bound) ---

def pneumonia_jpegs() -> list:
    folder = require(KERMANY)
    return [sorted((folder / label).glob("*.jpeg"))[0] for label in ("NORMAL", "PNEUMONIA")]


def assert_within_documented_bound(pillow: np.ndarray, opencv: np.ndarray):
    """Area vs Pillow's widened bilinear: per image, mean |diff| < 1 grey level, < 15% of pixels > 1 apart."""
    assert pillow.shape == opencv.shape and opencv.dtype == np.uint8
    diff = np.abs(pillow.astype(np.int16) - opencv.astype(np.int16))
    assert diff.mean() < 1.0, f"mean |diff| {diff.mean():.2f}"
    assert (diff > 1).mean() < 0.15, f"{100 * (diff > 1).mean():.1f}% of pixels more than 1 apart"


@needs_cv2
@pytest.mark.parametrize("name", COMPARED_NIH)
def test_opencv_matches_pillow_on_real_nih_pngs(name):
    data = (require(NIH / "images") / name).read_bytes()
    assert images.decode_grey_opencv(data, images.open_checked(data), 224) is not None  # no fallback to Pillow
    # before resizing (1024 -> 1024): the same pixels, RGBA included
    assert np.array_equal(decode_resize(data, 1024, "opencv"), decode_resize(data, 1024, "pillow"))
    for size in (224, 512):
        assert_within_documented_bound(decode_resize(data, size, "pillow"), decode_resize(data, size, "opencv"))


@needs_cv2
def test_opencv_matches_pillow_on_real_pneumonia_jpegs():
    for path in pneumonia_jpegs():
        data = path.read_bytes()
        assert Image.open(io.BytesIO(data)).size == (224, 224)
        assert images.decode_grey_opencv(data, images.open_checked(data), 192) is not None  # no fallback
        assert np.array_equal(decode_resize(data, 224, "opencv"), decode_resize(data, 224, "pillow"))
        assert_within_documented_bound(decode_resize(data, 192, "pillow"), decode_resize(data, 192, "opencv"))
        grown = np.abs(decode_resize(data, 512, "pillow").astype(int) - decode_resize(data, 512, "opencv"))
        assert grown.max() <= 1  # growing is bilinear on both paths
        # a reduced JPEG (DCT scale 2, as Pillow's draft picks) decodes to the same pixels
        assert np.array_equal(decode_resize(data, 112, "opencv"), decode_resize(data, 112, "pillow"))


def crafted(mode: str) -> Image.Image:
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 4096, (40, 40)).astype(np.uint16))
    return rgb.quantize(32) if mode == "P" else rgb.convert(mode)


@needs_cv2
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "I;16"])
def test_every_png_mode_gives_the_same_pixels_on_both_decoders_before_resizing(mode):
    """Colour PNGs (random colours, not just grey in RGB) convert with Pillow's own rounding; modes
    OpenCV would read differently (palette, 1-bit, grey + alpha) go to Pillow."""
    data = png_bytes(crafted(mode))
    took_opencv = images.decode_grey_opencv(data, images.open_checked(data), 40) is not None
    assert took_opencv == (mode in ("L", "RGB", "RGBA", "I;16"))
    assert np.array_equal(decode_resize(data, 40, "opencv"), decode_resize(data, 40, "pillow"))


@needs_cv2
def test_colour_jpeg_gives_the_same_luma_on_both_decoders():
    buffer = io.BytesIO()
    crafted("RGB").save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    assert np.array_equal(decode_resize(data, 40, "opencv"), decode_resize(data, 40, "pillow"))


def corrupt_inputs() -> dict:
    png = (require(NIH / "images") / "00000075_000.png").read_bytes()
    jpeg = pneumonia_jpegs()[0].read_bytes()
    return {
        "text": b"this is a text file, not an image",
        "png header only": png[:100],
        "truncated png": png[: len(png) // 2],
        "png with scrambled image data": png[:5000] + bytes(b ^ 0xFF for b in png[5000:5100]) + png[5100:],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
    }


@needs_cv2
def test_corrupt_bytes_raise_the_same_error_on_both_decoders():
    """The ETL quarantines rows by ImageError.reason and keeps the message: both must be the same."""
    for label, data in corrupt_inputs().items():
        errors = {}
        for decoder in ("pillow", "opencv"):
            with pytest.raises(ImageError) as caught:
                decode_resize(data, 64, decoder)
            errors[decoder] = (caught.value.reason, str(caught.value))
        assert errors["opencv"] == errors["pillow"], label
        assert errors["pillow"][0] in ("not_an_image", "undecodable"), (label, errors["pillow"])


def test_pillow_is_chosen_and_works_when_cv2_is_missing(monkeypatch):
    monkeypatch.setattr(images, "cv2", None)
    monkeypatch.setattr(images, "CV2_MISSING", "ModuleNotFoundError: No module named 'cv2'")
    monkeypatch.delenv("CXR_DECODER", raising=False)
    assert choose_decoder() == "pillow"
    data = (require(NIH / "images") / "00000100_000.png").read_bytes()
    assert decode_resize(data, 224).shape == (224, 224)
    with pytest.raises(DecoderChoiceError, match="pip install opencv-python-headless"):
        decode_resize(data, 224, "opencv")


def test_etl_images_imports_and_decodes_without_cv2():
    """A fresh interpreter where `import cv2` fails: the module loads and Pillow decodes."""
    script = ("import sys; sys.modules['cv2'] = None\n"
              "import numpy as np; from PIL import Image; import io\n"
              "from cxr_pipeline.etl import images\n"
              "buffer = io.BytesIO(); Image.new('L', (32, 32), 9).save(buffer, format='PNG')\n"
              "grey = images.decode_resize(buffer.getvalue(), 16)\n"
              "print(images.choose_decoder(), grey.shape, int(grey.max()), bool(images.CV2_MISSING))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pillow", "(16,", "16)", "9", "True"]


@needs_cv2
def test_decoder_chosen_by_argument_then_environment_then_cv2(monkeypatch):
    monkeypatch.delenv("CXR_DECODER", raising=False)
    assert choose_decoder() == "opencv"
    monkeypatch.setenv("CXR_DECODER", "pillow")
    assert choose_decoder() == "pillow"
    assert choose_decoder("opencv") == "opencv"
    data = (require(NIH / "images") / "00000404_000.png").read_bytes()
    assert np.array_equal(decode_resize(data, 224), decode_resize(data, 224, "pillow"))
    monkeypatch.setenv("CXR_DECODER", "pil")
    # not a ValueError: the ETL would quarantine every row instead of stopping
    with pytest.raises(DecoderChoiceError, match="CXR_DECODER='pil'"):
        decode_resize(data, 224)

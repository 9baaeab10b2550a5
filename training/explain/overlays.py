"""Grad-CAM heatmaps of a loaded checkpoint drawn over the image: what predict --overlay-dir, the pointing
game and a training run's MLflow examples all draw. Each overlay is at least 448 px on its long side
(gradcam.overlay upscales image and heatmap before blending) and carries the label and its probability
written in the image, so a file read alone says what it shows."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cxr_pipeline.schema import split_dir
from cxr_pipeline.training.explain.gradcam import class_activation_map, default_method, overlay, target_layer

EXAMPLES = 4  # overlays a training run logs to MLflow
TOP_LABELS = 3  # overlays per image of predict --overlay-dir without --label
BOX_COLOUR = (0, 255, 0)


def _text_mask(text: str, height: int) -> Image.Image:
    """White-on-black 'L' image of `text`, about `height` px tall. Pillow's bundled font (no font file
    needed, so it works offline anywhere): its scalable version where Pillow >= 10.1 has FreeType, else its
    bitmap font scaled up by a whole factor."""
    try:
        font = ImageFont.load_default(size=height)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    if isinstance(font, ImageFont.FreeTypeFont):
        return mask
    factor = max(1, round(height / max(mask.height, 1)))  # the bitmap font: Pillow < 10.1 or without FreeType
    return mask.resize((mask.width * factor, mask.height * factor), Image.NEAREST)


def caption(picture: Image.Image, text: str) -> Image.Image:
    """`text` in white on a dark band across the top of `picture` (in place), sized to the picture and shrunk
    to fit its width."""
    height = max(12, picture.height // 18)
    margin = max(2, height // 3)
    mask = _text_mask(text, height)
    if mask.width > picture.width - 2 * margin:
        ratio = (picture.width - 2 * margin) / mask.width
        mask = mask.resize((max(1, int(mask.width * ratio)), max(1, int(mask.height * ratio))), Image.LANCZOS)
    band = Image.new("RGB", (picture.width, mask.height + 2 * margin))
    picture.paste(Image.blend(picture.crop((0, 0, *band.size)), band, 0.7), (0, 0))
    picture.paste((255, 255, 255), (margin, margin, margin + mask.width, margin + mask.height), mask)
    return picture


def draw(grey: np.ndarray, heatmap: np.ndarray, label: str, probability: float,
         box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The overlay picture of one image and label: `label` and its probability written in it, and `box`
    ((x, y, width, height) in the stored pixels' coordinates, e.g. a pointing-game box) drawn scaled with
    the image."""
    picture = Image.fromarray(overlay(grey, heatmap))
    if box is not None:
        scale = picture.width / grey.shape[1]
        left, top, width, height = (value * scale for value in box)
        ImageDraw.Draw(picture).rectangle([left, top, left + width, top + height], outline=BOX_COLOUR,
                                          width=max(1, picture.width // 200))
    return caption(picture, f"{label}  p = {probability:.3f}")


def scorer_heatmap(scorer, stored: torch.Tensor, label_index: int, method: str | None = None,
                   extra_inputs: tuple = ()) -> np.ndarray:
    """(H, W) heatmap in [0, 1] of one image's stored pixels (1, 1, H, W) for one label, from a loaded
    checkpoint (training.serving.scorer.Scorer): its layer, its input transform, the label's logit. The map
    covers the whole stored image, whatever crop the scores use."""
    return class_activation_map(scorer.model, target_layer(scorer.model, scorer.model_name), scorer.inputs(stored),
                                scorer.layout.positive_logit(label_index),
                                method or default_method(scorer.model_name), extra_inputs)[0]


def file_name(image_id, label: str) -> str:
    """<image stem>_<label>.png, with characters a file system may refuse replaced."""
    return re.sub(r"[^\w.-]", "_", f"{Path(str(image_id)).stem}_{label}") + ".png"


def write_file_overlays(scorer, paths: list[tuple[str, Path]], folder: Path, label: str | None,
                        method: str | None, extra_inputs: tuple) -> None:
    """predict --overlay-dir: an overlay PNG per readable image file, for `label`, or for its TOP_LABELS most
    probable labels (as report 004 shows them), named <image>_<label>.png. Files that do not decode are
    skipped (predict's rows say why)."""
    from cxr_pipeline.etl.images import ImageError, decode_resize
    from cxr_pipeline.training.data.inputs import stored_pixels

    folder.mkdir(parents=True, exist_ok=True)
    names = scorer.spec.label_names
    for _, path in paths:
        try:
            grey = decode_resize(path.read_bytes(), scorer.spec.image_size, scorer.spec.decoder)
        except (ImageError, OSError):
            continue
        stored = stored_pixels(grey)
        probabilities = scorer.probabilities(stored, extra_inputs)[0]
        ranked = np.argsort(-probabilities, kind="stable")
        for chosen in [label] if label else [names[j] for j in ranked[:TOP_LABELS]]:
            heatmap = scorer_heatmap(scorer, stored, names.index(chosen), method, extra_inputs)
            draw(grey, heatmap, chosen, probabilities[names.index(chosen)]).save(folder / file_name(path, chosen))


def write_examples(checkpoint: Path, dataset, folder: Path, count: int = EXAMPLES) -> Path | None:
    """Overlays of the first `count` test (else val) images of an ETL dataset for their most probable label,
    from the stored pixels: <image>_<label>.png in `folder`. None for a dataset without uint8 pixels or
    without val and test rows."""
    from cxr_pipeline.training.models.fusion import metadata_features
    from cxr_pipeline.training.models.registry import uses_metadata
    from cxr_pipeline.training.serving.scorer import dataset_batches, load

    scorer = load(str(checkpoint))
    splits = [split for split in ("test", "val") if any(split_dir(dataset, split).glob("*.parquet"))][:1]
    if scorer.spec.pixel_dtype != "uint8" or not splits:
        return None
    extra = (metadata_features([None], [None], [None]),) if uses_metadata(scorer.model_name) else ()
    examples = []
    for ids, _, stored, _ in dataset_batches(Path(dataset), splits, scorer.spec, count):
        examples += [(image_id, stored[index:index + 1]) for index, image_id in enumerate(ids)]
        if len(examples) >= count:
            break
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, one in examples[:count]:
        probabilities = scorer.probabilities(one, extra)[0]
        best = int(np.argmax(probabilities))
        heatmap = scorer_heatmap(scorer, one, best, extra_inputs=extra)
        label = scorer.spec.label_names[best]
        draw(one[0, 0].numpy(), heatmap, label, probabilities[best]).save(folder / file_name(image_id, label))
    return folder

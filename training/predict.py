"""Per-label probabilities, operating-point decisions and heatmap overlays for raw images.

    python -m training.predict --checkpoint RUN_DIR/best_finetune.pth IMAGE_OR_DIR... [--overlay-dir DIR]

Takes what the ETL takes (PNG, JPEG, DICOM), prepared the same way (grey, resized to the
training size, normalised as the dataset's metadata says). A label is called positive when
its probability reaches the threshold chosen on validation (Youden's J) and stored in the
checkpoint by train.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from etl.images import ImageError, decode_resize
from etl.schema import DatasetSpec
from training import checkpoints
from training.data import model_input
from training.gradcam import METHODS, class_activation_map, default_method, overlay, target_layer
from training.models import build_model, metadata_features, uses_metadata
from training.targets import LabelLayout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


def image_paths(arguments: list[str]) -> list[Path]:
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            paths.extend(sorted(p for p in argument.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif argument.exists():
            paths.append(argument)
        else:
            raise SystemExit(f"{argument}: no such file or folder")
    return paths


def load(checkpoint_path: str):
    try:
        checkpoint = checkpoints.load(Path(checkpoint_path))
    except checkpoints.CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    if "dataset_spec" not in checkpoint:
        raise SystemExit(f"{checkpoint_path} is not a best_<stage>.pth written by train.py")
    spec = DatasetSpec.from_json(checkpoint["dataset_spec"])
    layout = LabelLayout(spec)
    model = build_model(checkpoint["model_name"], layout.num_outputs, "none")
    model.load_state_dict(checkpoint["model"])
    thresholds = checkpoint.get("thresholds") or [None] * spec.num_labels
    return model.eval(), checkpoint["model_name"], spec, layout, thresholds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="images (PNG, JPEG, DICOM) or folders of them")
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth from train.py")
    parser.add_argument("--overlay-dir", help="write a heatmap overlay PNG per image here")
    parser.add_argument("--label", help="label of the overlays (default: each image's most probable label)")
    parser.add_argument("--cam", choices=METHODS,
                        help="heatmap method (default: gradcam; hirescam for small_cnn and the VGGs, whose heads "
                             "keep position)")
    fusion = parser.add_argument_group("patient data, for models that fuse it (<model>+meta); unknown if left out")
    fusion.add_argument("--age", type=float, help="age in years")
    fusion.add_argument("--sex", choices=["M", "F"])
    fusion.add_argument("--view-position", help="PA, AP, LL or LATERAL")
    args = parser.parse_args(argv)

    model, model_name, spec, layout, thresholds = load(args.checkpoint)
    extra_inputs = (metadata_features([args.age], [args.sex], [args.view_position]),) if uses_metadata(model_name) else ()
    if args.label and args.label not in spec.label_names:
        raise SystemExit(f"--label {args.label!r} is not one of {list(spec.label_names)}")
    if args.overlay_dir:
        Path(args.overlay_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for path in image_paths(args.paths):
        try:
            grey = decode_resize(path.read_bytes(), spec.image_size)
        except ImageError as exc:
            print(f"{path}: skipped, {exc}")
            continue
        images = model_input(torch.from_numpy(grey[None, None].copy()), spec)
        with torch.no_grad():
            probabilities = layout.probabilities(model(images, *extra_inputs))[0].numpy()
        print(path)
        for name, probability, threshold in sorted(zip(spec.label_names, probabilities, thresholds),
                                                   key=lambda item: -item[1]):
            decision = "" if threshold is None else (
                f"  {'POSITIVE' if probability >= threshold else 'negative'} (threshold {threshold:.3f})")
            print(f"  {name:<20} {probability:.3f}{decision}")
        result = {"path": str(path), "probabilities": dict(zip(spec.label_names, map(float, probabilities)))}
        if args.overlay_dir:
            label = args.label or spec.label_names[int(np.argmax(probabilities))]
            heatmap = class_activation_map(model, target_layer(model, model_name), images,
                                           layout.positive_logit(spec.label_names.index(label)),
                                           args.cam or default_method(model_name), extra_inputs)[0]
            result["overlay"] = str(Path(args.overlay_dir) / f"{path.stem}_{label}.png")
            Image.fromarray(overlay(grey, heatmap)).save(result["overlay"])
        results.append(result)
    return results


if __name__ == "__main__":
    main()

"""Generate a small, learnable dataset in the NIH ChestX-ray14 layout (no download needed).

    python -m etl.demo_data --output demo_data/nih

Writes `images/*.png` and `Data_Entry_2017.csv`. Each image is a synthetic chest (body,
two lungs, noise); each finding draws an opacity in its own lung zone, so the labels change
what the image shows and a model can learn them. Patients have several follow-up images
whose findings persist, which is what makes a patient-level split matter.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cxr_pipeline.etl.sources.nih import LABEL_NAMES

HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
          "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def zone_centres(size: int) -> list[tuple[float, float]]:
    """One centre per label: 7 zones down each lung."""
    rows = np.linspace(0.28, 0.78, 7)
    return [(size * (0.32 if i % 2 == 0 else 0.68), size * rows[i // 2]) for i in range(len(LABEL_NAMES))]


def chest_image(size: int, findings: list[int], rng: np.random.Generator, tone: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.full((size, size), 0.08, np.float32)
    image[((x - size / 2) / (0.46 * size)) ** 2 + ((y - size / 2) / (0.5 * size)) ** 2 < 1] = 0.55 + tone
    for cx in (0.32, 0.68):
        lung = ((x - cx * size) / (0.15 * size)) ** 2 + ((y - 0.52 * size) / (0.32 * size)) ** 2 < 1
        image[lung] = 0.22 + tone
    centres = zone_centres(size)
    for label in findings:
        cx, cy = centres[label]
        cx, cy = cx + rng.normal(0, 0.02 * size), cy + rng.normal(0, 0.015 * size)
        radius = size * rng.uniform(0.035, 0.055)
        image += 0.3 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
    image += rng.normal(0, 0.06, image.shape).astype(np.float32)
    grey = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    return np.asarray(grey)


def generate(output: Path, patients: int = 240, size: int = 256, prevalence: float = 0.18, seed: int = 0) -> int:
    """Write the dataset; returns the number of images."""
    rng = np.random.default_rng(seed)
    (output / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    with (output / "Data_Entry_2017.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for patient in range(1, patients + 1):
            chronic = [k for k in range(len(LABEL_NAMES)) if rng.random() < prevalence]
            tone, age, sex = rng.normal(0, 0.04), int(rng.integers(18, 90)), rng.choice(["M", "F"])
            for follow_up in range(int(rng.integers(1, 4))):
                findings = sorted(set(k for k in chronic if rng.random() < 0.85)
                                  | {k for k in range(len(LABEL_NAMES)) if rng.random() < prevalence / 4})
                name = f"{patient:08d}_{follow_up:03d}.png"
                Image.fromarray(chest_image(size, findings, rng, tone)).save(output / "images" / name)
                labels = "|".join(LABEL_NAMES[k] for k in findings) or "No Finding"
                view = rng.choice(["PA", "AP"], p=[0.7, 0.3])
                writer.writerow([name, labels, follow_up, patient, age + follow_up, sex, view, size, size, 0.143, 0.143])
                count += 1
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_data/nih", help="folder to create (default demo_data/nih)")
    parser.add_argument("--patients", type=int, default=240, help="patients, 1-3 images each (default 240)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = generate(Path(args.output), args.patients, args.size, seed=args.seed)
    print(f"wrote {count} images of {args.patients} patients to {args.output}")


if __name__ == "__main__":
    main()

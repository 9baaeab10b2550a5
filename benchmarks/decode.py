"""Decode + resize images/s, OpenCV vs Pillow (etl/images.py), and how far apart their pixels are.

    python -m benchmarks.decode [--repeats 3] [--sizes 224 512] [--jpegs 200] [--threads 1]

Speed: the 100 real 1024 px NIH PNGs (6 of them RGBA), held in memory (file reads not timed),
through decode_resize with each decoder; the two alternate within each repeat so that load from
other processes falls on both; medians of --repeats. OpenCV runs on --threads threads (default
1, so both figures are per core, as Pillow's are). The ratio is OpenCV / Pillow: above 1 means
the default decoder (OpenCV, when cv2 imports) earns its place.
Pixels: |opencv - pillow| per pixel over every image: the largest, the mean (of per-image means),
the worst image's mean, the share of pixels more than 1 grey level apart, the 99.9th percentile.
The same figures for --jpegs pediatric pneumonia JPEGs (224 px) at 192 (the pneumonia recipe's
size), 224 (no resize: the JPEG decoders alone) and 512 px, when that folder is present.
`make bench` (benchmarks/run.py) puts figures() in its table through add_figures().
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from cxr_pipeline.etl import images
from cxr_pipeline.etl.images import decode_resize

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
DECODERS = ("pillow", "opencv")


def rate(blobs: list[bytes], size: int, decoder: str) -> float:
    """Images/s of decode_resize over `blobs` with one decoder."""
    started = time.perf_counter()
    for data in blobs:
        decode_resize(data, size, decoder)
    return len(blobs) / (time.perf_counter() - started)


def difference(blobs: list[bytes], size: int) -> dict:
    """|opencv - pillow| over all pixels of all images: max, mean, worst image mean, share > 1, p99.9."""
    histogram = np.zeros(256, dtype=np.int64)
    image_means = []
    for data in blobs:
        a = decode_resize(data, size, "pillow").astype(np.int16)
        b = decode_resize(data, size, "opencv").astype(np.int16)
        diff = np.abs(a - b).astype(np.uint8)
        histogram += np.bincount(diff.ravel(), minlength=256)
        image_means.append(float(diff.mean()))
    cumulative = np.cumsum(histogram) / histogram.sum()
    return {"max": int(np.flatnonzero(histogram)[-1]), "mean": statistics.fmean(image_means),
            "worst_image_mean": max(image_means), "share_over_1": float(histogram[2:].sum() / histogram.sum()),
            "p99_9": int(np.searchsorted(cumulative, 0.999))}


def measure(blobs: list[bytes], sizes, repeats: int, threads: int = 1) -> dict[int, dict]:
    """{size: {"pillow": img/s, "opencv": img/s, "ratio": opencv/pillow, **difference}}."""
    cv2 = images.cv2
    previous = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        results = {}
        for size in sizes:
            for decoder in DECODERS:  # warm-up: imports, first allocations
                rate(blobs[:5], size, decoder)
            rates = {decoder: [] for decoder in DECODERS}
            for repeat in range(repeats):
                for decoder in DECODERS if repeat % 2 == 0 else DECODERS[::-1]:
                    rates[decoder].append(rate(blobs, size, decoder))
            medians = {decoder: statistics.median(values) for decoder, values in rates.items()}
            results[size] = {**medians, "ratio": medians["opencv"] / medians["pillow"], **difference(blobs, size)}
        return results
    finally:
        cv2.setNumThreads(previous)


def describe(difference_figures: dict) -> str:
    d = difference_figures
    return (f"|diff| max {d['max']}, mean {d['mean']:.2f} (worst image {d['worst_image_mean']:.2f}), "
            f"{100 * d['share_over_1']:.1f}% of pixels > 1, p99.9 {d['p99_9']}")


def figures(images_dir: Path, repeats: int) -> list[tuple]:
    """Rows for benchmarks/run.py's table: (figure, value, limit, ratio, target)."""
    if images.cv2 is None:
        return [("Decode+resize, OpenCV vs Pillow", "not measured", f"cv2 does not import ({images.CV2_MISSING})",
                 None, None)]
    blobs = [path.read_bytes() for path in sorted(images_dir.glob("*.png"))]
    rows = []
    for size, result in measure(blobs, (224, 512), repeats).items():
        rows.append((f"Decode+resize img/s on 1 core, real NIH PNGs -> {size} px (OpenCV)", f"{result['opencv']:.1f}",
                     f"Pillow {result['pillow']:.1f}", result["ratio"], 1.0))
        rows.append((f"Pixels OpenCV vs Pillow at {size} px (reported)", describe(result), "etl/images.py docstring",
                     None, None))
    return rows


def add_figures(add, images_dir: Path, repeats: int) -> None:
    """benchmarks/run.py's hook: add(figure, value, limit, ratio, target) for each row of figures()."""
    for row in figures(images_dir, repeats):
        add(*row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per decoder and size (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="NIH output sizes (default 224 512)")
    parser.add_argument("--jpegs", type=int, default=200, help="pneumonia JPEGs to compare, 0 for none (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1: per-core figures)")
    args = parser.parse_args(argv)
    if images.cv2 is None:
        raise SystemExit(f"cv2 does not import ({images.CV2_MISSING}): pip install opencv-python-headless==4.11.*")
    nih = SHARED_DATA / "nih" / "images"
    if not nih.exists():
        raise SystemExit(f"real NIH images not found in {nih}; set CXR_SHARED_DATA to the shared/data folder")
    blobs = [path.read_bytes() for path in sorted(nih.glob("*.png"))]
    print(f"{len(blobs)} NIH PNGs, OpenCV {images.cv2.__version__} on {args.threads} thread(s), "
          f"medians of {args.repeats} passes")
    for size, result in measure(blobs, args.sizes, args.repeats, args.threads).items():
        print(f"  {size:4d} px: Pillow {result['pillow']:6.1f} img/s, OpenCV {result['opencv']:6.1f} img/s, "
              f"ratio {result['ratio']:.2f}; {describe(result)}")
    jpegs = sorted((SHARED_DATA / "kermany" / "train").glob("*/*.jpeg"))
    if args.jpegs and jpegs:
        step = max(len(jpegs) // args.jpegs, 1)
        blobs = [path.read_bytes() for path in jpegs[::step][: args.jpegs]]
        print(f"{len(blobs)} pneumonia JPEGs (every {step}th of kermany/train, both classes)")
        for size, result in measure(blobs, (192, 224, 512), args.repeats, args.threads).items():
            print(f"  {size:4d} px: Pillow {result['pillow']:6.1f} img/s, OpenCV {result['opencv']:6.1f} img/s, "
                  f"ratio {result['ratio']:.2f}; {describe(result)}")


if __name__ == "__main__":
    main()

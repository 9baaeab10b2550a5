"""Score images with a trained checkpoint: calibrated probabilities and decisions, to a file.

    python -m training.predict --checkpoint RUN_DIR/best_finetune.pth /data/new_studies/ --output predictions.csv
    python -m training.predict --checkpoint C 'scans/*.png' list_of_paths.txt --output p.csv --parquet
    python -m training.predict --checkpoint C /data/nih_224 --split test --output p.csv   # an ETL dataset
    python -m training.predict --checkpoint C image.png --overlay-dir heatmaps/           # terminal + Grad-CAM

Inputs: image files (PNG, JPEG, DICOM), folders (searched recursively), glob patterns, text
files listing one path per line, or a Parquet dataset written by etl/preprocess.py. Images are
prepared exactly as for training: the ETL's decode and resize (with the decoder that made the
training data), then training.inputs with the state the checkpoint carries (normalisation,
evaluation resize and crop).

One output row per input image: `image_id`, `path`, the calibrated probability of each label
(calibration fitted on val by train.py), `<label>_positive` (1/0) at the run's operating point
(thresholds chosen on val), and `error`: an unreadable image gets its reason there and empty
scores, and the run goes on.
"""
from __future__ import annotations

import argparse
import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from cxr_pipeline.etl import versions
from cxr_pipeline.etl.images import ImageError, decode_resize
from cxr_pipeline.schema import SPLITS, DatasetSpec, read_dataset_spec, split_dir
from cxr_pipeline.training import calibration, checkpoints
from cxr_pipeline.training.data import stored_tensor
from cxr_pipeline.training.inputs import InputTransform, stored_pixels
from cxr_pipeline.training.gradcam import METHODS, class_activation_map, default_method, overlay, target_layer
from cxr_pipeline.training.label_files import DECISION_SUFFIX, ERROR_COLUMN
from cxr_pipeline.training.models import build_model, metadata_features, uses_metadata
from cxr_pipeline.training.targets import LabelLayout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
LIST_SUFFIXES = (".txt", ".lst")
TOP_LABELS = 3  # overlays per image without --label
log = logging.getLogger("predict")


@dataclass
class Scorer:
    """A checkpoint ready to score: model, label layout, and what train.py fitted on val."""

    model: torch.nn.Module
    model_name: str
    spec: DatasetSpec
    inputs: InputTransform
    layout: LabelLayout
    calibration: list[dict] | None  # training.calibration states; None for checkpoints from before it
    thresholds: list[float | None]  # per label, at `operating_point`
    operating_point: str | None

    @torch.no_grad()
    def probabilities(self, stored: torch.Tensor, extra_inputs: tuple = ()) -> np.ndarray:
        """(N, *spec.pixel_shape) stored pixels (as the ETL writes them) -> (N, L) calibrated probabilities."""
        logits = self.model(self.inputs(stored, evaluation=True), *extra_inputs)
        return calibration.apply(self.calibration, self.layout.probabilities(logits).numpy())

    def decisions(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, L) 1/0 at the operating point; NaN for labels without a threshold."""
        thresholds = np.array([np.nan if t is None else t for t in self.thresholds], dtype=np.float64)
        return np.where(np.isnan(thresholds), np.nan, (probabilities >= thresholds).astype(np.float64))


def load(checkpoint_path: str) -> Scorer:
    try:
        checkpoint = checkpoints.load(Path(checkpoint_path))
    except checkpoints.CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    if "dataset_spec" not in checkpoint:
        raise SystemExit(f"{checkpoint_path} is not a best_<stage>.pth written by train.py")
    spec = DatasetSpec.from_json(checkpoint["dataset_spec"])
    layout = LabelLayout(spec)
    model = build_model(checkpoint["model_name"], layout.num_outputs, "none", spec.image_size)
    model.load_state_dict(checkpoint["model"])
    inputs = InputTransform.from_state(spec, checkpoint.get("inputs"))
    return Scorer(model.eval(), checkpoint["model_name"], spec, inputs, layout, checkpoint.get("calibration"),
                  checkpoint.get("thresholds") or [None] * spec.num_labels, checkpoint.get("operating_point"))


def is_dataset(path: Path) -> bool:
    """An ETL output: a dataset root with versions, one version, or a plain dataset folder."""
    return path.is_dir() and (versions.resolve(path).path / "_etl_summary.json").exists()


def image_paths(arguments: list[str]) -> list[tuple[str, Path]]:
    """(image_id, path) per image: ids relative to the folder given, else the path as given."""
    found = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found += [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*"))
                      if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    listed = Path(line.strip())
                    found.append((line.strip(), listed if listed.is_absolute() else path.parent / listed))
        elif any(char in argument for char in "*?["):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise SystemExit(f"{argument}: the pattern matches no file")
            found += [(match, Path(match)) for match in matches]
        else:  # a missing file is listed with its error, like an unreadable one
            found.append((argument, path))
    return found


def decoded_batches(items: list, decode, batch_size: int):
    """(start, chunk, stored uint8 pixels of the decodable items, {index in chunk: error}) per batch of `items`;
    `decode(item)` returns the grey uint8 image or raises ImageError with the reason. Files (read_batches) and
    encoded bytes (serving) share it, so both are decoded and batched alike."""
    for start in range(0, len(items), batch_size):
        chunk, pixels, errors = items[start:start + batch_size], [], {}
        for index, item in enumerate(chunk):
            try:
                pixels.append(decode(item))
            except ImageError as exc:
                errors[index] = str(exc)
        stored = torch.from_numpy(np.stack(pixels)[:, None]) if pixels else None
        yield start, chunk, stored, errors


def read_batches(paths: list[tuple[str, Path]], spec: DatasetSpec, batch_size: int):
    """(ids, paths, stored uint8 pixels of the readable ones, {index: error}) per batch."""
    def decode(entry: tuple[str, Path]):
        path = entry[1]
        try:
            return decode_resize(path.read_bytes(), spec.image_size, spec.decoder)
        except FileNotFoundError:
            raise ImageError("image_missing", f"no such file {path}") from None
        except OSError as exc:
            raise ImageError("unreadable_file", f"{exc.strerror or exc} ({path})") from None

    for _, chunk, stored, errors in decoded_batches(paths, decode, batch_size):
        yield [i for i, _ in chunk], [str(p) for _, p in chunk], stored, errors


def dataset_batches(dataset: Path, splits: list[str], spec: DatasetSpec, batch_size: int):
    """The same for the stored pixels of an ETL dataset (already decoded and resized)."""
    for split in splits:
        folder = split_dir(dataset, split)
        if not folder.exists():
            continue
        for file in sorted(folder.glob("*.parquet")):
            parquet = pq.ParquetFile(file)
            for batch in parquet.iter_batches(batch_size, columns=["image_id", spec.pixel_column]):
                stored = stored_tensor(batch.column(spec.pixel_column).to_pylist(), spec)
                ids = batch.column("image_id").to_pylist()
                yield ids, [f"{split}/{i}" for i in ids], stored, {}


def predict_rows(scorer: Scorer, batches, total: int, extra_inputs: tuple = ()) -> pd.DataFrame:
    """One row per image of `batches`: probabilities, decisions, error."""
    names = list(scorer.spec.label_names)
    frames = []
    with tqdm(total=total, desc="scoring", unit="img") as bar:
        for ids, paths, stored, errors in batches:
            probabilities = np.full((len(ids), len(names)), np.nan)
            readable = [i for i in range(len(ids)) if i not in errors]
            if readable:
                extra = tuple(t.expand(len(readable), -1) for t in extra_inputs)
                probabilities[readable] = scorer.probabilities(stored, extra)
            frame = pd.DataFrame(probabilities, columns=names)
            frame.insert(0, "path", paths)
            frame.insert(0, "image_id", ids)
            decisions = scorer.decisions(probabilities)
            for index, name in enumerate(names):
                frame[f"{name}{DECISION_SUFFIX}"] = pd.array(
                    np.where(np.isnan(probabilities[:, index]), np.nan, decisions[:, index])).astype("Int8")
            frame[ERROR_COLUMN] = [errors.get(i, "") for i in range(len(ids))]
            frames.append(frame)
            bar.update(len(ids))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_overlays(scorer: Scorer, paths: list[tuple[str, Path]], folder: Path, label: str | None, cam: str | None,
                   extra_inputs: tuple) -> None:
    """Grad-CAM overlay PNGs per readable image: for `label`, or for its TOP_LABELS most probable
    labels (as report 004 shows them), named <image>_<label>.png. Heatmaps cover the whole image:
    they come from the uncropped input, whatever crop the scores used."""
    folder.mkdir(parents=True, exist_ok=True)
    names = scorer.spec.label_names
    for _, path in paths:
        try:
            grey = decode_resize(path.read_bytes(), scorer.spec.image_size, scorer.spec.decoder)
        except (ImageError, OSError):
            continue
        stored = stored_pixels(grey)
        images = scorer.inputs(stored)
        ranked = np.argsort(-scorer.probabilities(stored, extra_inputs)[0], kind="stable")
        for chosen in [label] if label else [names[j] for j in ranked[:TOP_LABELS]]:
            heatmap = class_activation_map(scorer.model, target_layer(scorer.model, scorer.model_name), images,
                                           scorer.layout.positive_logit(names.index(chosen)),
                                           cam or default_method(scorer.model_name), extra_inputs)[0]
            Image.fromarray(overlay(grey, heatmap)).save(folder / f"{path.stem}_{chosen}.png")


def print_rows(rows: pd.DataFrame, scorer: Scorer) -> None:
    for row in rows.to_dict("records"):
        print(row["path"])
        if row[ERROR_COLUMN]:
            print(f"  skipped: {row[ERROR_COLUMN]}")
            continue
        for name, threshold in sorted(zip(scorer.spec.label_names, scorer.thresholds), key=lambda x: -row[x[0]]):
            decision = "" if threshold is None else (
                f"  {'POSITIVE' if row[name] >= threshold else 'negative'} (threshold {threshold:.3f})")
            print(f"  {name:<20} {row[name]:.3f}{decision}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+",
                        help="images, folders, glob patterns, .txt lists of paths, or one ETL dataset folder")
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth from train.py")
    parser.add_argument("--output", help="CSV to write, one row per input image (default: print to the terminal)")
    parser.add_argument("--parquet", action="store_true", help="also write the rows as Parquet beside --output")
    parser.add_argument("--split", action="append", choices=SPLITS,
                        help="with an ETL dataset: the split(s) to score (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--overlay-dir", help="write Grad-CAM overlay PNGs here, <image>_<label>.png")
    parser.add_argument("--label", help=f"label of the overlays (default: each image's {TOP_LABELS} most probable "
                                        "labels)")
    parser.add_argument("--cam", choices=METHODS,
                        help="heatmap method (default: gradcam; hirescam for small_cnn and the VGGs, whose heads "
                             "keep position)")
    fusion = parser.add_argument_group("patient data, for models that fuse it (<model>+meta); unknown if left out")
    fusion.add_argument("--age", type=float, help="age in years")
    fusion.add_argument("--sex", choices=["M", "F"])
    fusion.add_argument("--view-position", help="PA, AP, LL or LATERAL")
    return parser


def main(argv=None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scorer = load(args.checkpoint)
    extra = (metadata_features([args.age], [args.sex], [args.view_position]),) if uses_metadata(scorer.model_name) \
        else ()
    if args.label and args.label not in scorer.spec.label_names:
        raise SystemExit(f"--label {args.label!r} is not one of {list(scorer.spec.label_names)}")
    if len(args.inputs) == 1 and is_dataset(Path(args.inputs[0])):
        dataset = versions.resolve(args.inputs[0]).path
        stored_spec = read_dataset_spec(dataset)
        if stored_spec.image_size != scorer.spec.image_size or stored_spec.pixel_dtype != scorer.spec.pixel_dtype:
            raise SystemExit(f"{dataset} holds {stored_spec.image_size} px {stored_spec.pixel_dtype} pixels, the model "
                             f"was trained on {scorer.spec.image_size} px {scorer.spec.pixel_dtype}: rerun the ETL at "
                             "that size, or pass the image files")
        splits = args.split or list(SPLITS)
        total = sum(pq.ParquetFile(f).metadata.num_rows for s in splits if split_dir(dataset, s).exists()
                    for f in split_dir(dataset, s).glob("*.parquet"))
        paths, batches = [], dataset_batches(dataset, splits, stored_spec, args.batch_size)
    else:
        paths = image_paths(args.inputs)
        total, batches = len(paths), read_batches(paths, scorer.spec, args.batch_size)
    rows = predict_rows(scorer, batches, total, extra)
    failed = int((rows[ERROR_COLUMN] != "").sum()) if len(rows) else 0
    log.info("scored %d images with %s (%s, operating point %s); %d unreadable, listed with their reason",
             len(rows) - failed, args.checkpoint, "calibrated" if scorer.calibration else "not calibrated",
             scorer.operating_point or "none", failed)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(output, index=False, float_format="%.6f")
        if args.parquet:
            rows.to_parquet(output.with_suffix(".parquet"), index=False)
        log.info("wrote %s%s", output, " and its .parquet" if args.parquet else "")
    else:
        print_rows(rows, scorer)
    if args.overlay_dir:
        write_overlays(scorer, paths, Path(args.overlay_dir), args.label, args.cam, extra)
    return rows


if __name__ == "__main__":
    main()

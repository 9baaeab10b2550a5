"""A train.py checkpoint ready to score, and the images it scores: files, encoded bytes or ETL rows in, rows of
training/serving/predictions.py out. What `training.predict`, the MLflow model, jobs/score.py, ensembles,
Grad-CAM and the learned-filter pages load.

Images are prepared exactly as for training: the ETL's decode and resize (with the decoder that made the
training data), then training.data.inputs with the state the checkpoint carries (normalisation, evaluation
resize and crop).

Prevalence (`adjust_rows`: `predict --prevalence`, the MLflow model's `prevalence` param): the calibrated
probabilities hold val's prevalence (the checkpoint's `val_prevalence`); rows can be moved to another, given or
estimated from the rows themselves (training/evaluation/prevalence.py). Decisions stay those at the run's
thresholds on the unadjusted probabilities: the adjustment is monotone, so that is the run's threshold moved
with it, and the operating point (e.g. sens>=0.95) keeps the meaning it was chosen for.
"""
from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cxr_pipeline.etl import versions
from cxr_pipeline.etl.images import ImageError, decode_resize
from cxr_pipeline.schema import DatasetSpec, split_dir
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.data.reader import stored_tensor
from cxr_pipeline.training.data.targets import LabelLayout
from cxr_pipeline.training.evaluation import calibration, prevalence
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.serving.predictions import PREVALENCE_COLUMN, ModelIdentity, decide, prediction_frame

log = logging.getLogger("scorer")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
AUTO = "auto"  # a prevalence setting: estimate it from the rows scored
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class Scorer:
    """A checkpoint ready to score: model, label layout, what train.py fitted on val, and which model it is."""

    model: torch.nn.Module
    model_name: str
    spec: DatasetSpec
    inputs: InputTransform
    layout: LabelLayout
    calibration: list[dict] | None  # training.evaluation.calibration states; None for checkpoints from before it
    thresholds: list[float | None]  # per label, at `operating_point`
    operating_point: str | None
    identity: ModelIdentity
    # per label, from val (training/loop/outputs.py); None for checkpoints from before they were stored
    val_prevalence: list[float | None] | None = None  # the fraction positive: the prior of the calibration
    val_score_deciles: list[list[float] | None] | None = None  # 10 %, ..., 90 % of val's calibrated probabilities

    @torch.no_grad()
    def probabilities(self, stored: torch.Tensor, extra_inputs: tuple = (), calibrated: bool = True) -> np.ndarray:
        """(N, *spec.pixel_shape) stored pixels (as the ETL writes them) -> (N, L) calibrated probabilities
        (`calibrated` False: the network's own, as before calibration)."""
        logits = self.model(self.inputs(stored, evaluation=True), *extra_inputs)
        raw = self.layout.probabilities(logits).float().numpy()
        return calibration.apply(self.calibration, raw) if calibrated else raw.astype(np.float64)


def load(checkpoint_path: str) -> Scorer:
    path = Path(checkpoint_path)
    try:
        checkpoint = checkpoints.load(path)
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
                  checkpoint.get("thresholds") or [None] * spec.num_labels, checkpoint.get("operating_point"),
                  checkpoint_identity(path, checkpoint), checkpoint.get("val_prevalence"),
                  checkpoint.get("val_score_deciles"))


def checkpoint_identity(path: Path, checkpoint: dict) -> ModelIdentity:
    """The sha256 checkpoints.save recorded, the file's place, and the training run and dataset version the
    checkpoint holds (training/loop/epochs.py)."""
    return ModelIdentity(checkpoint_sha256=checkpoints.recorded_sha256(path), model_uri=str(path.resolve()),
                         run_id=checkpoint.get("run_id"), dataset_version=checkpoint.get("dataset_version"))


def size_mismatch(trained: DatasetSpec, given: str, source, instead: str = "score the image files themselves "
                  "(decoded and resized as the model's ETL did)") -> str:
    """The one message for pixels of another size than the model's, saying what to do."""
    return (f"{source} holds {given}, the model was trained on {trained.image_size} px {trained.pixel_dtype} pixels: "
            f"rerun the ETL at that size (etl/preprocess.py --size {trained.image_size}), or {instead}")


def check_pixels(trained: DatasetSpec, stored: DatasetSpec, source, **instead) -> None:
    """Refuse a dataset whose stored pixels are not the size and type the model was trained on."""
    if (stored.image_size, stored.pixel_dtype) != (trained.image_size, trained.pixel_dtype):
        raise SystemExit(size_mismatch(trained, f"{stored.image_size} px {stored.pixel_dtype} pixels", source,
                                       **instead))


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


def read_image(path: Path) -> bytes:
    """An image file's bytes; ImageError `image_missing` or `unreadable_file` (the reasons every scorer gives:
    read_batches, jobs/score.py's executors, the MLflow model's allow-listed paths)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("image_missing", f"no such file {path}") from None
    except OSError as exc:
        raise ImageError("unreadable_file", f"{exc.strerror or exc} ({path})") from None


def read_batches(paths: list[tuple[str, Path]], spec: DatasetSpec, batch_size: int, read=None):
    """(ids, paths, stored uint8 pixels of the readable ones, {index: error}) per batch. `read((id, path))` gives
    a file's bytes or raises ImageError with the reason (default: read_image of the path)."""
    def decode(entry: tuple[str, Path]):
        data = read(entry) if read else read_image(entry[1])
        try:
            return decode_resize(data, spec.image_size, spec.decoder)
        except OSError as exc:  # a decoder's read error (a truncated file)
            raise ImageError("unreadable_file", f"{exc.strerror or exc} ({entry[1]})") from None

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
    """One row per image of `batches` (training/serving/predictions.py's columns), under the scorer's identity."""
    names = scorer.spec.label_names
    scored_at = datetime.now(timezone.utc)
    frames = []
    with tqdm(total=total, desc="scoring", unit="img") as bar:
        for ids, paths, stored, errors in batches:
            probabilities = np.full((len(ids), len(names)), np.nan)
            readable = [i for i in range(len(ids)) if i not in errors]
            if readable:
                extra = tuple(t.expand(len(readable), -1) for t in extra_inputs)
                probabilities[readable] = scorer.probabilities(stored, extra)
            frames.append(prediction_frame(names, ids, paths, probabilities, decide(probabilities, scorer.thresholds),
                                           [errors.get(i, "") for i in range(len(ids))], scorer.identity, scored_at))
            bar.update(len(ids))
    if not frames:
        nothing = np.empty((0, len(names)))
        return prediction_frame(names, [], [], nothing, nothing, [], scorer.identity, scored_at)
    return pd.concat(frames, ignore_index=True)


class PrevalenceError(ValueError):
    """A prevalence setting that cannot be applied (predict says it and stops; the MLflow model raises it)."""


def prevalence_targets(setting: str | None, label_names) -> dict[str, float | str]:
    """A prevalence setting -> {label: prevalence in (0, 1), or "auto"} for the labels to adjust: "" or None
    (none), "auto" (every label, estimated), "P" (a one-label model) or "label=P,label2=auto" (labels named as
    the model names them, in any case)."""
    setting, names = (setting or "").strip(), list(label_names)
    if not setting:
        return {}
    if "=" not in setting:
        if setting.lower() == AUTO:
            return dict.fromkeys(names, AUTO)
        if len(names) != 1:
            raise PrevalenceError(f"prevalence {setting!r}: the model has {len(names)} labels; name them, "
                                  f"e.g. '{names[0]}={setting}', or use 'auto'")
        return {names[0]: _prevalence_value(setting, names[0])}
    by_name, targets = {name.lower(): name for name in names}, {}
    for part in setting.split(","):
        label, _, value = (piece.strip() for piece in part.partition("="))
        if label.lower() not in by_name:
            raise PrevalenceError(f"prevalence {setting!r}: {label!r} is not one of the model's labels {names}")
        targets[by_name[label.lower()]] = AUTO if value.lower() == AUTO else _prevalence_value(value, label)
    return targets


def _prevalence_value(text: str, label: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = np.nan
    if not 0 < value < 1:
        raise PrevalenceError(f"prevalence of {label}: {text!r} is not a number in (0, 1) nor 'auto'")
    return value


def checked_targets(scorer: Scorer, setting: str | None) -> dict[str, float | str]:
    """prevalence_targets, refused (PrevalenceError, saying what to do) where the checkpoint has no val
    prevalence to move the probabilities from."""
    names = list(scorer.spec.label_names)
    targets = prevalence_targets(setting, names)
    if targets and scorer.val_prevalence is None:
        raise PrevalenceError(f"{scorer.identity.model_uri or 'the checkpoint'} holds no val prevalence (it was "
                              "trained before train.py stored one), so its probabilities cannot be moved to "
                              "another prevalence: retrain the model, or score without --prevalence (the MLflow model: "
                              "without its prevalence param)")
    priors = dict(zip(names, scorer.val_prevalence or []))
    unusable = [name for name in targets if priors[name] is None or not 0 < priors[name] < 1]
    given = [name for name in unusable if targets[name] != AUTO]
    if given:
        raise PrevalenceError(f"val had no known truth, or only one class, for {', '.join(given)} (val prevalence "
                              f"{', '.join(str(priors[name]) for name in given)}), so there is no prevalence to move "
                              "their probabilities from: leave them out of the prevalence setting")
    if unusable:
        log.warning("prevalence: %s left as they are (val had no known truth or one class only: val prevalence %s)",
                    ", ".join(unusable), ", ".join(str(priors[name]) for name in unusable))
    return {name: target for name, target in targets.items() if name not in unusable}


def check_enough_to_estimate(targets: dict, scored: int) -> None:
    """PrevalenceError, saying what to do, where a label is to be estimated ("auto") from fewer than
    prevalence.MIN_IMAGES scored images."""
    if AUTO in targets.values() and scored < prevalence.MIN_IMAGES:
        raise PrevalenceError(f"'auto' estimates the prevalence from the images scored together: {scored} here, at "
                              f"least {prevalence.MIN_IMAGES} needed (from fewer the estimate, and the probabilities "
                              "moved to it, are noise). Score the site's images together (predict over their "
                              "folder), or give the prevalence as a number")


def adjust_rows(scorer: Scorer, rows: pd.DataFrame, setting: str | dict | None,
                seed: int = 0) -> tuple[pd.DataFrame, list[prevalence.PrevalenceEstimate]]:
    """Prediction rows (predict_rows) with the probabilities of the labels `setting` names (prevalence_targets,
    or what checked_targets made of it) moved from val's prevalence to the one given, or, for "auto", to the one
    estimated from these rows' probabilities (every scored row together, at least prevalence.MIN_IMAGES of them);
    PREVALENCE_COLUMN says which, as JSON.
    Decisions are left as the run's thresholds made them (see the module doc). Returns the rows and the
    estimates made."""
    names = list(scorer.spec.label_names)
    targets = setting if isinstance(setting, dict) else checked_targets(scorer, setting)
    if not targets:
        return rows, []
    uncalibrated = [name for name, state in zip(names, scorer.calibration or [{"method": "none"}] * len(names))
                    if name in targets and state["method"] == "none"]
    if uncalibrated:
        log.warning("%s not calibrated on val: the prevalence adjustment assumes calibrated probabilities, "
                    "theirs may be off", ", ".join(uncalibrated))
    probabilities = rows[names].to_numpy(dtype=np.float64)
    check_enough_to_estimate(targets, int(np.isfinite(probabilities).any(axis=1).sum()))
    estimated = [name for name in names if targets.get(name) == AUTO]
    estimates = prevalence.estimate(probabilities[:, [names.index(name) for name in estimated]],
                                    [scorer.val_prevalence[names.index(name)] for name in estimated], estimated,
                                    seed=seed) if estimated else []
    used = {**targets, **{e.label: e.estimate for e in estimates}}
    target = [used[name] if name in used and np.isfinite(used[name]) else None for name in names]
    adjusted = prevalence.adjust(probabilities, scorer.val_prevalence, target)
    stated = json.dumps({name: round(float(value), 4) for name, value in zip(names, target) if value is not None})
    return rows.assign(**{name: adjusted[:, index] for index, name in enumerate(names)},
                       **{PREVALENCE_COLUMN: stated if stated != "{}" else ""}), estimates

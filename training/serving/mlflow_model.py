"""A trained checkpoint as an MLflow pyfunc model: images in, calibrated probabilities and decisions out.

    model = mlflow.pyfunc.load_model("models:/cxr-nih/3")           # or runs:/RUN_ID/model, or a folder
    model.predict(pd.DataFrame({"content": [png_bytes, jpeg_bytes]}))  # encoded PNG / JPEG / DICOM bytes
    model.predict(pd.DataFrame({"path": ["new/00000001_000.png"]}))   # only below $CXR_MODEL_PATH_ROOT

Input: a DataFrame with one of these columns (the first present is used):
- `content`: the encoded bytes of image files (PNG, JPEG, DICOM); over HTTP (`mlflow models serve`), base64 in
  JSON, as MLflow encodes every binary column;
- `pixels_u8` (`pixels_f32` for float datasets): rows of an ETL dataset, pixels as the ETL stored them, at
  the model's size (what `training.predict` scores from a dataset folder);
- `path`: image files on the host that runs the model, read only where that host allows it: the model reads
  no path unless the environment variable CXR_MODEL_PATH_ROOT names a folder, and then only paths that resolve
  (symlinks and `..` followed, relative paths taken from that folder) to a regular file below it. Any other
  path is refused before anything is opened: its row gets the error `path_not_allowed` and no scores (the
  other rows are scored). A client of a scoring server must never make the server read its files; trusted
  batch jobs read the files themselves and pass `content` (jobs/score.py), `training.predict` reads paths
  directly.
Output, row for row, in the columns of training/serving/predictions.py (as `training.predict` writes them):
`image_id` and `path` (the path given; empty for bytes and pixels), the calibrated probability of each label,
`<label>_positive` (1/0 at the run's operating point; empty where the label has no threshold), `error` (empty,
or why the image could not be scored: the row is kept and its scores are empty), the checkpoint's sha256, the
training run and its dataset version, and scored_at. `model_uri` is left empty: the model does not know the
URI it was loaded by (jobs/score.py fills it in). Empty scores and decisions are missing values of nullable
numeric columns (pandas `Float64` and `Int32`, `pd.NA`), never float NaN: the scoring server writes them as
JSON `null` (NaN is not JSON, and strict parsers refuse it).

Nothing is prepared differently from training.predict: paths are read as `scorer.read_batches` reads them, bytes
and files through the same `etl.images.decode_resize` with the dataset's size and decoder, and every batch through
`scorer.predict_rows` and the checkpoint's `Scorer` (its input transform, calibration and thresholds).
The checkpoint (with its sha256 sidecar; it names the training run and dataset version) is the model's one
artifact, and the `cxr_pipeline` sources (its etl and training subpackages, laid out as the wheel installs
them) travel with it (`code_paths`), so it loads where this repository is not installed.
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import stat
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from cxr_pipeline.etl.images import ImageError, decode_resize
from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.data.reader import stored_tensor
from cxr_pipeline.training.serving import scorer as scoring
from cxr_pipeline.training.serving.predictions import arrow_schema, label_columns, prediction_frame

PATH_COLUMN, CONTENT_COLUMN = "path", "content"
# The one folder below which the model reads `path`s, set on the host that runs it; unset: no path is read
PATH_ROOT_ENV = "CXR_MODEL_PATH_ROOT"
PATH_NOT_ALLOWED = "path_not_allowed"
CHECKPOINT_ARTIFACT = "checkpoint"
CHECKPOINT_FILE = "model.pth"  # inside the checkpoint artifact folder, beside model.pth.sha256
DEFAULT_BATCH_SIZE = 32
# "Models from code": the logged model is this module's class, built by this file, not a pickle (as
# checkpoints load weights only)
MODEL_CODE = ("import mlflow\n\nfrom cxr_pipeline.training.serving.mlflow_model import ChestXrayModel\n\n"
              "mlflow.models.set_model(ChestXrayModel())\n")
# What the model needs at load time (training.serving.scorer's imports; DICOM through pydicom and its JPEG 2000
# plugin), pinned to the versions it was trained with; the ones not installed here are left out.
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "scipy", "scikit-learn",
                "matplotlib", "tqdm", "pyyaml", "opencv-python-headless", "pydicom", "pylibjpeg",
                "pylibjpeg-openjpeg", "mlflow-skinny")


def input_column(frame: pd.DataFrame, spec: DatasetSpec) -> str:
    for column in (PATH_COLUMN, CONTENT_COLUMN, spec.pixel_column):
        if column in frame.columns:
            return column
    raise ValueError(f"the model's input needs a '{PATH_COLUMN}' column (image files), a '{CONTENT_COLUMN}' "
                     f"column (encoded PNG/JPEG/DICOM bytes) or '{spec.pixel_column}' (ETL rows); got "
                     f"{list(frame.columns)}")


def path_root() -> str | None:
    """The folder this host lets the model read paths below ($CXR_MODEL_PATH_ROOT, made absolute); None, the
    default, when it is unset: then no path is read."""
    root = os.environ.get(PATH_ROOT_ENV, "").strip()
    return os.path.abspath(root) if root else None


def allowed_path(value: str, root: str | None) -> Path:
    """The file `value` names, resolved (symlinks and `..`; relative to `root`), if that lies below `root`;
    otherwise ImageError `path_not_allowed`, decided without opening anything. A name is first checked as it
    stands, below `root` as configured or as its symlinks resolve (a root under a linked folder is reached by
    either name), so a name outside is refused without looking anything up, the same whether or not such a
    file exists; then its own symlinks, resolved, must stay below the root's real place."""
    if root is None:
        raise ImageError(PATH_NOT_ALLOWED, f"this model reads no files (the host has not set {PATH_ROOT_ENV}): "
                                           f"send the image's bytes as '{CONTENT_COLUMN}'")
    real_root = os.path.realpath(root)

    def below(path: str, folder: str) -> bool:
        return os.path.commonpath([folder, path]) == folder

    try:
        lexical = os.path.normpath(os.path.join(root, value))
        named_below = below(lexical, os.path.normpath(root)) or below(lexical, real_root)
        resolved = os.path.realpath(lexical) if named_below else None
    except ValueError:  # a NUL byte in the name
        resolved = None
    if resolved is None or not below(resolved, real_root):
        raise ImageError(PATH_NOT_ALLOWED, f"{value!r} is not below the folder this host lets the model read "
                                           f"({PATH_ROOT_ENV}): send the image's bytes as '{CONTENT_COLUMN}'")
    return Path(resolved)


def read_allowed(value: str, root: str | None) -> bytes:
    """The bytes of an allowed path's regular file (a FIFO or a device would block or never end), with
    training.predict's reasons for a missing or unreadable one."""
    path = allowed_path(value, root)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True  # missing or unreadable: scorer.read_image says which
    if not regular:
        raise ImageError("unreadable_file", f"not a regular file ({value})")
    return scoring.read_image(path)


def path_batches(paths: list[str], spec: DatasetSpec, batch_size: int, root: str | None):
    """scorer.read_batches for paths a client gave: the same ids, paths, decode and reasons, each path read
    only if allowed (read_allowed)."""
    return scoring.read_batches([(value, Path(value)) for value in paths], spec, batch_size,
                                read=lambda entry: read_allowed(entry[0], root))


def content_batches(contents: list[bytes], spec: DatasetSpec, batch_size: int):
    """scorer.read_batches for encoded bytes: the same decode, the same (ids, paths, stored, errors) batches,
    their ids and paths empty (bytes have none)."""
    def decode(data: bytes):
        try:
            return decode_resize(bytes(data), spec.image_size, spec.decoder)
        except ImageError:
            raise
        except (ValueError, OSError) as exc:  # what the ETL quarantines as well
            raise ImageError("undecodable", str(exc)) from None

    for _, chunk, stored, errors in scoring.decoded_batches(contents, decode, batch_size):
        yield [None] * len(chunk), [None] * len(chunk), stored, errors


def stored_batches(rows: list[bytes], spec: DatasetSpec, batch_size: int):
    """Pixels as the ETL stored them (scorer.dataset_batches' rows); a row of the wrong size is an error."""
    expected = int(np.prod(spec.pixel_shape)) * (1 if spec.pixel_dtype == "uint8" else 4)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        errors = {index: "wrong_size: " + scoring.size_mismatch(spec, f"{len(data)} bytes of pixels, not {expected}",
                                                                "the row")
                  for index, data in enumerate(chunk) if len(data) != expected}
        good = [bytes(data) for index, data in enumerate(chunk) if index not in errors]
        yield [None] * len(chunk), [None] * len(chunk), stored_tensor(good, spec) if good else None, errors


def score_frame(scorer: scoring.Scorer, frame: pd.DataFrame, batch_size: int = DEFAULT_BATCH_SIZE,
                root: str | None = None) -> pd.DataFrame:
    """One output row per input row, in the columns of training/serving/predictions.py (see the module doc);
    paths are read only below `root` (path_root())."""
    column = input_column(frame, scorer.spec)
    values = frame[column].tolist()
    present = [i for i, value in enumerate(values) if not missing(value)]
    given = [values[i] for i in present]
    if column == PATH_COLUMN:
        batches = path_batches([str(value) for value in given], scorer.spec, batch_size, root)
    elif column == CONTENT_COLUMN:
        batches = content_batches(given, scorer.spec, batch_size)
    else:
        batches = stored_batches(given, scorer.spec, batch_size)
    scored = scoring.predict_rows(scorer, batches, len(given)).set_axis(present)
    absent = sorted(set(range(len(values))) - set(present))
    if absent:
        nothing = np.full((len(absent), scorer.spec.num_labels), np.nan)
        empty = prediction_frame(scorer.spec.label_names, [None] * len(absent), [None] * len(absent), nothing, nothing,
                                 [f"no_input: the row's {column} is empty"] * len(absent), scorer.identity)
        scored = pd.concat([scored, empty.set_axis(absent)]).sort_index()
    return scored.set_axis(frame.index)


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def nullable_scores(frame: pd.DataFrame, label_names) -> pd.DataFrame:
    """The probability columns as pandas Float64, NaN masked as missing (pd.NA). The scoring server answers
    `frame.to_dict(orient="records")` through json.dump (mlflow.pyfunc.scoring_server.predictions_to_json),
    which writes float NaN as the bare token NaN (not JSON) but a masked value as null; in-process callers
    keep numeric columns (`to_numpy(float)` gives NaN back). Decisions are Int32 already."""
    scores = {}
    for name in label_columns(label_names):
        values = frame[name].to_numpy(np.float64, na_value=np.nan, copy=True)
        scores[name] = pd.arrays.FloatingArray(values, mask=np.isnan(values))
    return frame.assign(**scores)


class ChestXrayModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour's model: training.serving.scorer's Scorer over the logged checkpoint."""

    def load_context(self, context) -> None:
        self.scorer = scoring.load(str(Path(context.artifacts[CHECKPOINT_ARTIFACT]) / CHECKPOINT_FILE))
        # loaded from a folder of this process: the URI it was loaded by is the caller's to record
        self.scorer.identity = dataclasses.replace(self.scorer.identity, model_uri=None)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        scored = score_frame(self.scorer, pd.DataFrame(model_input), batch_size, path_root())
        # `prevalence`: "" (val's), "auto" (estimated from this call's images), "P" or "label=P,...": as predict's
        scored, _ = scoring.adjust_rows(self.scorer, scored, (params or {}).get("prevalence"))
        return nullable_scores(scored, self.scorer.spec.label_names)


def signature(spec: DatasetSpec):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", PATH_COLUMN, required=False), ColSpec("binary", CONTENT_COLUMN, required=False),
                     ColSpec("binary", spec.pixel_column, required=False)])
    kinds = {pa.string(): "string", pa.float64(): "double", pa.int32(): "integer",
             pa.timestamp("us", tz="UTC"): "datetime"}
    outputs = Schema([ColSpec(kinds[field.type], field.name, required=False)
                      for field in arrow_schema(spec.label_names)])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE),
                                                        ParamSpec("prevalence", "string", "")]))


def input_example(spec: DatasetSpec) -> pd.DataFrame:
    """A synthetic PNG (a smooth gradient, no patient's pixels) as `content`: what the registry shows."""
    ramp = np.linspace(0, 255, spec.image_size, dtype=np.float32)
    grey = (np.add.outer(ramp, ramp) / 2).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(grey).save(encoded, format="PNG")
    return pd.DataFrame({CONTENT_COLUMN: [encoded.getvalue()]})


def pip_requirements() -> list[str]:
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def package_sources(folder: Path) -> Path:
    """Copy cxr_pipeline with its etl and training subpackages into `folder`, laid out as the wheel installs
    them, from the wheel or from a checkout (whose folders the editable install maps onto those names)."""
    import cxr_pipeline
    import cxr_pipeline.etl
    import cxr_pipeline.training

    root = folder / "cxr_pipeline"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(cxr_pipeline.__file__).parent, root,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "etl", "training", "jobs"))
    for package in (cxr_pipeline.etl, cxr_pipeline.training):
        shutil.copytree(Path(package.__file__).parent, root / package.__name__.rsplit(".", 1)[1], ignore=ignore)
    return root


def log_model(checkpoint: Path, name: str = "model", registered_model_name: str | None = None,
              tags: dict | None = None):
    """Log best_<stage>.pth as a pyfunc model in the active MLflow run (registered under
    `registered_model_name` when given); returns mlflow's ModelInfo."""
    checkpoint = Path(checkpoint)
    scorer = scoring.load(str(checkpoint))
    with tempfile.TemporaryDirectory() as folder:
        artifact = Path(folder) / CHECKPOINT_ARTIFACT
        artifact.mkdir()
        shutil.copyfile(checkpoint, artifact / CHECKPOINT_FILE)
        shutil.copyfile(checkpoint.with_name(checkpoint.name + ".sha256"), artifact / f"{CHECKPOINT_FILE}.sha256")
        code = Path(folder) / "cxr_model.py"
        code.write_text(MODEL_CODE)
        where = {"name": name} if int(mlflow.__version__.split(".")[0]) >= 3 else {"artifact_path": name}
        return mlflow.pyfunc.log_model(
            **where, python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(artifact)},
            code_paths=[str(package_sources(Path(folder)))],
            signature=signature(scorer.spec), input_example=input_example(scorer.spec),
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
            metadata={"dataset_spec": scorer.spec.to_json(), "model_name": scorer.model_name,
                      "operating_point": scorer.operating_point, "calibrated": bool(scorer.calibration),
                      # per label, in label order (None: unknown): jobs/score.py's shift monitor compares with them
                      "val_prevalence": scorer.val_prevalence, "val_score_deciles": scorer.val_score_deciles,
                      **(tags or {})})


# ---- executors: one loaded model per process ------------------------------------------------------------
_LOADED: dict[str, object] = {}


def cached_model(local_path: str):
    """mlflow.pyfunc.load_model(local_path), once per process (a Spark executor's Python worker)."""
    if local_path not in _LOADED:
        _LOADED[local_path] = mlflow.pyfunc.load_model(local_path)
    return _LOADED[local_path]

"""A trained checkpoint as an MLflow pyfunc model: images in, calibrated probabilities and decisions out.

    model = mlflow.pyfunc.load_model("models:/cxr-nih/3")           # or runs:/RUN_ID/model, or a folder
    model.predict(pd.DataFrame({"path": ["/data/new/00000001_000.png", "scan.dcm"]}))
    model.predict(pd.DataFrame({"content": [png_bytes, jpeg_bytes]}))  # encoded PNG / JPEG / DICOM bytes

Input: a DataFrame with one of these columns (the first present is used):
- `path`: image files (PNG, JPEG, DICOM);
- `content`: the encoded bytes of such files;
- `pixels_u8` (`pixels_f32` for float datasets): rows of an ETL dataset, pixels as the ETL stored them, at
  the model's size (what `training.predict` scores from a dataset folder).
Output, row for row: the calibrated probability of each label, `<label>_positive` (1/0 at the run's
operating point; empty where the label has no threshold) and `error` (empty, or why the image could
not be scored: the row is kept and its scores are empty).

Nothing is prepared differently from training.predict: paths go through `predict.read_batches`, bytes
through the same `etl.images.decode_resize` with the dataset's size and decoder, and every batch through
`predict.predict_rows` and the checkpoint's `Scorer` (its input transform, calibration and thresholds).
The checkpoint (with its sha256 sidecar) is the model's one artifact, and the `cxr_pipeline` sources
(its etl and training subpackages, laid out as the wheel installs them) travel with it (`code_paths`),
so it loads where this repository is not installed.
"""
from __future__ import annotations

import io
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from cxr_pipeline.etl.images import ImageError, decode_resize
from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training import predict
from cxr_pipeline.training.data import stored_tensor
from cxr_pipeline.training.label_files import DECISION_SUFFIX, ERROR_COLUMN

PATH_COLUMN, CONTENT_COLUMN = "path", "content"
CHECKPOINT_ARTIFACT = "checkpoint"
CHECKPOINT_FILE = "model.pth"  # inside the checkpoint artifact folder, beside model.pth.sha256
DEFAULT_BATCH_SIZE = 32
# "Models from code": the logged model is this module's class, built by this file, not a pickle (as
# checkpoints load weights only)
MODEL_CODE = ("import mlflow\n\nfrom cxr_pipeline.training.serving import ChestXrayModel\n\n"
              "mlflow.models.set_model(ChestXrayModel())\n")
# What the model needs at load time (training.predict's imports; DICOM through pydicom and its JPEG 2000
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


def content_batches(contents: list[bytes], spec: DatasetSpec, batch_size: int):
    """predict.read_batches for encoded bytes: the same decode, the same (ids, paths, stored, errors) batches."""
    def decode(data: bytes):
        try:
            return decode_resize(bytes(data), spec.image_size, spec.decoder)
        except ImageError:
            raise
        except (ValueError, OSError) as exc:  # what the ETL quarantines as well
            raise ImageError("undecodable", str(exc)) from None

    for start, chunk, stored, errors in predict.decoded_batches(contents, decode, batch_size):
        ids = [str(start + i) for i in range(len(chunk))]
        yield ids, ids, stored, errors


def stored_batches(rows: list[bytes], spec: DatasetSpec, batch_size: int):
    """Pixels as the ETL stored them (predict.dataset_batches' rows); a row of the wrong size is an error."""
    expected = int(np.prod(spec.pixel_shape)) * (1 if spec.pixel_dtype == "uint8" else 4)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        errors = {index: f"wrong_size: {len(data)} bytes of pixels, the model takes {expected} "
                         f"({spec.image_size} px {spec.pixel_dtype}); rerun the ETL at that size"
                  for index, data in enumerate(chunk) if len(data) != expected}
        good = [bytes(data) for index, data in enumerate(chunk) if index not in errors]
        ids = [str(start + i) for i in range(len(chunk))]
        yield ids, ids, stored_tensor(good, spec) if good else None, errors


def score_frame(scorer: predict.Scorer, frame: pd.DataFrame, batch_size: int = DEFAULT_BATCH_SIZE) -> pd.DataFrame:
    """One output row per input row: probabilities, `<label>_positive` and `error` (see the module doc)."""
    column = input_column(frame, scorer.spec)
    values = frame[column].tolist()
    present = [i for i, value in enumerate(values) if not missing(value)]
    given = [values[i] for i in present]
    if column == PATH_COLUMN:
        batches = predict.read_batches([(str(i), Path(value)) for i, value in enumerate(given)], scorer.spec,
                                       batch_size)
    elif column == CONTENT_COLUMN:
        batches = content_batches(given, scorer.spec, batch_size)
    else:
        batches = stored_batches(given, scorer.spec, batch_size)
    rows = predict.predict_rows(scorer, batches, len(given))
    columns = output_columns(scorer.spec)
    if rows.empty:
        rows = pd.DataFrame({name: pd.Series(dtype="float64") for name in columns})
    rows = rows.drop(columns=["image_id", "path"], errors="ignore").set_axis(present)
    scored = rows.reindex(range(len(values)))[columns]
    scored[ERROR_COLUMN] = scored[ERROR_COLUMN].fillna(f"no_input: the row's {column} is empty")
    for name in scorer.spec.label_names:
        scored[f"{name}{DECISION_SUFFIX}"] = scored[f"{name}{DECISION_SUFFIX}"].astype("Int8")
    return scored.set_axis(frame.index)


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def output_columns(spec: DatasetSpec) -> list[str]:
    names = list(spec.label_names)
    return [*names, *(f"{name}{DECISION_SUFFIX}" for name in names), ERROR_COLUMN]


class ChestXrayModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour's model: training.predict's Scorer over the logged checkpoint."""

    def load_context(self, context) -> None:
        self.scorer = predict.load(str(Path(context.artifacts[CHECKPOINT_ARTIFACT]) / CHECKPOINT_FILE))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        return score_frame(self.scorer, pd.DataFrame(model_input), batch_size)


def signature(spec: DatasetSpec):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", PATH_COLUMN, required=False), ColSpec("binary", CONTENT_COLUMN, required=False),
                     ColSpec("binary", spec.pixel_column, required=False)])
    outputs = Schema([*(ColSpec("double", name) for name in spec.label_names),
                      *(ColSpec("integer", f"{name}{DECISION_SUFFIX}", required=False) for name in spec.label_names),
                      ColSpec("string", ERROR_COLUMN)])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]))


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
    scorer = predict.load(str(checkpoint))
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
                      **(tags or {})})


# ---- executors: one loaded model per process ------------------------------------------------------------
_LOADED: dict[str, object] = {}


def cached_model(local_path: str):
    """mlflow.pyfunc.load_model(local_path), once per process (a Spark executor's Python worker)."""
    if local_path not in _LOADED:
        _LOADED[local_path] = mlflow.pyfunc.load_model(local_path)
    return _LOADED[local_path]

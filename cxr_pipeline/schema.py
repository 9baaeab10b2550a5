"""The Parquet layout of a preprocessed dataset, defined once.

The ETL writes a :class:`DatasetSpec` as JSON into the Spark field metadata of the
pixel column, so it lives in every Parquet file's footer. Loaders call
:func:`read_dataset_spec` instead of restating sizes, label names or
normalisation constants. Pure Python + pyarrow: no Spark, no torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# ImageNet statistics: the pretrained backbones expect them on 3 channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PIXEL_DTYPES = ("uint8", "float32")
SPLITS = ("train", "val", "test")
SPEC_METADATA_KEY = "cxr_dataset_spec"
SPARK_ROW_METADATA = b"org.apache.spark.sql.parquet.row.metadata"

# Column name -> logical type. The Spark job builds its StructType from this.
# `labels` is a multi-hot vector in `DatasetSpec.label_names` order.
METADATA_COLUMNS = {
    "image_id": "string",
    "patient_id": "string",
    "source_path": "string",
    "source_row": "long",
    "labels": "array<float>",
    "age": "int",
    "sex": "string",
    "view_position": "string",
}
# Written only when the spec says so (`has_mask`, `folds`), so datasets without them keep their layout.
# `label_mask` is 1.0 where a label counts in the loss, 0.0 where an uncertainty policy masked it out.
LABEL_MASK_COLUMN = "label_mask"
# `fold` is 0..folds-1 for train and val rows (val is fold 0), null for test rows.
FOLD_COLUMN = "fold"
# The uncertainty policy (etl/uncertainty.py) under which `labels` holds, for that label, the class
# index 0 (negative), 1 (uncertain) or 2 (positive) instead of 0/1: the model needs a 3-way output.
MULTICLASS_POLICY = "U-MultiClass"


@dataclass(frozen=True)
class DatasetSpec:
    """What a loader must know to turn stored rows back into model input."""

    dataset: str
    label_names: tuple[str, ...]
    image_size: int
    pixel_dtype: str = "uint8"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # label name -> uncertainty policy that made its `labels` entries (CheXpert); empty: plain multi-hot.
    label_policies: dict[str, str] = dataclasses.field(default_factory=dict)
    has_mask: bool = False  # rows carry LABEL_MASK_COLUMN
    folds: int = 0  # > 0: rows carry FOLD_COLUMN (K-fold train/val of the train_val part)
    # etl.images decoder that made the pixels; predict decodes new images with the same one. Specs
    # from before the choice existed were all made with Pillow.
    decoder: str = "pillow"

    def __post_init__(self):
        if self.pixel_dtype not in PIXEL_DTYPES:
            raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {self.pixel_dtype!r}")
        unknown = sorted(set(self.label_policies) - set(self.label_names))
        if unknown:
            raise ValueError(f"label_policies name labels that are not in label_names: {unknown}")

    @property
    def pixel_column(self) -> str:
        return "pixels_u8" if self.pixel_dtype == "uint8" else "pixels_f32"

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """Stored shape: grey uint8 (1, H, W), or already normalised float32 (3, H, W)."""
        channels = 1 if self.pixel_dtype == "uint8" else 3
        return (channels, self.image_size, self.image_size)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def multiclass_labels(self) -> tuple[str, ...]:
        """Labels whose `labels` entry is a class index 0/1/2 (MULTICLASS_POLICY), in label order."""
        return tuple(name for name in self.label_names if self.label_policies.get(name) == MULTICLASS_POLICY)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetSpec":
        """Specs written before a field existed parse with that field's default."""
        raw = json.loads(text)
        for key in ("label_names", "mean", "std"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def metadata_columns(spec: DatasetSpec) -> dict[str, str]:
    """METADATA_COLUMNS plus the optional columns this spec says its rows carry."""
    columns = dict(METADATA_COLUMNS)
    if spec.has_mask:
        columns[LABEL_MASK_COLUMN] = "array<float>"
    if spec.folds:
        columns[FOLD_COLUMN] = "int"
    return columns


def split_dir(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"split={split}"


def read_dataset_spec(dataset_dir: str | Path) -> DatasetSpec:
    """Read the spec back from the footer of the first Parquet file of the dataset."""
    import pyarrow.parquet as pq

    files = sorted(Path(dataset_dir).glob("split=*/*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no Parquet files under {dataset_dir}/split=*/: run etl/preprocess.py first "
            "or point --dataset at its --output folder"
        )
    metadata = pq.read_schema(files[0]).metadata or {}
    if SPARK_ROW_METADATA not in metadata:
        raise ValueError(f"{files[0]} was not written by etl/preprocess.py (no Spark row metadata)")
    for field in json.loads(metadata[SPARK_ROW_METADATA])["fields"]:
        if SPEC_METADATA_KEY in field.get("metadata", {}):
            return DatasetSpec.from_json(field["metadata"][SPEC_METADATA_KEY])
    raise ValueError(f"{files[0]} has no {SPEC_METADATA_KEY!r} column metadata")

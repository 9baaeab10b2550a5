"""CheXpert uncertainty policies (Irvin et al., AAAI 2019) and the U-SelfTrained relabel step.

A CheXpert label entry is 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned).
A policy says what an uncertain entry becomes, for all labels or per label:

    U-Zeros        0
    U-Ones         1
    U-Ignore       masked out of the loss (`label_mask` 0; the label value is 0, never NaN)
    U-MultiClass   the label holds a class index: 0 negative, 1 uncertain, 2 positive
                   (the model needs a 3-way output for it; `DatasetSpec.multiclass_labels`)
    U-SelfTrained  first pass as U-Ignore; then `relabel_uncertain` replaces the masked
                   entries by the first model's probabilities and unmasks them, and the
                   model is trained again on the relabelled dataset

Blank entries are negative (0), or masked with blank policy U-Ignore.

Relabel a dataset written by etl/preprocess.py with the probabilities that training wrote
(`RUN_DIR/predictions_<stage>_<split>.csv`: image_id, then one column per label):

    python -m etl.uncertainty --dataset /data/chexpert_224 --predictions RUN/predictions_kt_train.csv \\
        --output /data/chexpert_224_selftrained
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.etl import versions
from cxr_pipeline.etl.sources.manifest import Manifest
from cxr_pipeline.schema import LABEL_MASK_COLUMN, MULTICLASS_POLICY, read_dataset_spec

U_ZEROS, U_ONES, U_IGNORE, U_SELFTRAINED = "U-Zeros", "U-Ones", "U-Ignore", "U-SelfTrained"
U_MULTICLASS = MULTICLASS_POLICY
POLICIES = (U_ZEROS, U_ONES, U_IGNORE, U_MULTICLASS, U_SELFTRAINED)
BLANK_POLICIES = (U_ZEROS, U_IGNORE)
MASKING_POLICIES = (U_IGNORE, U_SELFTRAINED)
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


@dataclass
class PolicyManifest(Manifest):
    """A manifest whose `labels` went through `apply_policy`: rows also hold `raw_labels` (the
    source's 1/0/-1/NaN values) and, when some policy masks, LABEL_MASK_COLUMN."""

    label_policies: dict[str, str] = field(default_factory=dict)


def spec_label_fields(manifest: Manifest) -> dict:
    """The DatasetSpec fields that say how a manifest's labels were made (none for plain multi-hot)."""
    if not isinstance(manifest, PolicyManifest):
        return {}
    return {"label_policies": dict(manifest.label_policies), "has_mask": LABEL_MASK_COLUMN in manifest.rows}


def canonical_policy(name: str, allowed: Sequence[str] = POLICIES) -> str:
    """'u-ones' -> 'U-Ones'; ValueError naming the valid ones otherwise."""
    by_lower = {policy.lower(): policy for policy in allowed}
    try:
        return by_lower[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown uncertainty policy {name!r}; choose one of {list(allowed)}") from None


def parse_policies(spec: str | Mapping | None, label_names: Sequence[str], default: str = U_ZEROS) -> tuple[str, ...]:
    """One policy per label, in label order.

    `spec` is a policy for all labels ('U-Ones'), or a default followed by per-label choices
    ('U-Zeros,Atelectasis=U-Ones,Cardiomegaly=U-MultiClass'), or the same as a mapping
    ({'default': 'U-Zeros', 'Atelectasis': 'U-Ones'}, as a YAML config gives it).
    """
    if spec is None or spec == "":
        return tuple(default for _ in label_names)
    if isinstance(spec, Mapping):
        items = [(str(key), str(value)) for key, value in spec.items()]
    else:
        items = [tuple(part.split("=", 1)) if "=" in part else ("default", part)
                 for part in (piece.strip() for piece in str(spec).split(",")) if part]
    per_label = {}
    for key, value in items:
        key = key.strip()
        if key in per_label:
            raise ValueError(f"uncertainty policy given twice for {key!r} in {spec!r}")
        per_label[key] = canonical_policy(value)
    default = per_label.pop("default", default)
    unknown = sorted(set(per_label) - set(label_names))
    if unknown:
        raise ValueError(f"uncertainty policy names unknown labels {unknown}; labels are {list(label_names)}")
    return tuple(per_label.get(name, default) for name in label_names)


def apply_policy(raw_values: np.ndarray, policies: Sequence[str],
                 blank: str = U_ZEROS) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) raw values in {1, 0, -1, NaN} and one policy per column -> (labels, mask), float32.

    mask is 1 where the entry counts in the loss. Masked entries have label 0 so that a
    consumer that ignores the mask still sees finite values.
    """
    raw = np.asarray(raw_values, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(policies):
        raise ValueError(f"raw values of shape {raw.shape} need one policy per column, got {len(policies)}")
    valid = np.isnan(raw) | np.isin(raw, (POSITIVE, NEGATIVE, UNCERTAIN))
    if not valid.all():
        raise ValueError(f"raw label values must be 1, 0, -1 or blank, found {sorted(set(raw[~valid].tolist()))[:5]}")
    blank = canonical_policy(blank, BLANK_POLICIES)
    positive, uncertain, missing = raw == POSITIVE, raw == UNCERTAIN, np.isnan(raw)
    labels = positive.astype(np.float32)
    mask = np.ones(raw.shape, dtype=np.float32)
    for column, policy in enumerate(canonical_policy(p) for p in policies):
        if policy == U_ONES:
            labels[:, column] = positive[:, column] | uncertain[:, column]
        elif policy == U_MULTICLASS:
            labels[:, column] = 2.0 * positive[:, column] + 1.0 * uncertain[:, column]
        elif policy in MASKING_POLICIES:
            mask[uncertain[:, column], column] = 0.0
    if blank == U_IGNORE:
        mask[missing] = 0.0
    return labels, mask


def relabel_uncertain(labels: np.ndarray, mask: np.ndarray, probabilities: np.ndarray,
                      relabel_columns: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """U-SelfTrained's second step: masked entries of the chosen columns take the first model's
    probability (a soft label) and count in the loss again. Other entries are unchanged. (With
    blank policy U-Ignore, masked blanks of those labels are relabelled as well.)"""
    labels, mask = np.array(labels, dtype=np.float32), np.array(mask, dtype=np.float32)
    probabilities = np.asarray(probabilities, dtype=np.float32)
    chosen = (mask == 0.0) & np.asarray(relabel_columns, dtype=bool)[None, :]
    needed = probabilities[chosen]
    if np.isnan(needed).any() or (needed < 0).any() or (needed > 1).any():
        raise ValueError("probabilities for the entries to relabel must be finite and in [0, 1] "
                         "(training writes sigmoid outputs in predictions_<stage>_<split>.csv)")
    labels[chosen] = needed
    mask[chosen] = 1.0
    return labels, mask


# ---- relabel a written dataset ---------------------------------------------------------------
def read_predictions(paths: Sequence[str | Path], label_names: Sequence[str]) -> pd.DataFrame:
    """image_id -> one probability column per label, from training's prediction CSVs."""
    frames = [pd.read_csv(path, dtype={"image_id": str}) for path in paths]
    table = pd.concat(frames, ignore_index=True)
    missing = [name for name in ("image_id", *label_names) if name not in table.columns]
    if missing:
        raise ValueError(f"prediction CSVs {list(map(str, paths))} lack columns {missing}; "
                         "they must be training's predictions_<stage>_<split>.csv for this dataset")
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{len(duplicated)} image ids have more than one prediction, e.g. {list(duplicated[:3])}")
    return table.set_index("image_id")[list(label_names)]


def relabel_table(table, relabel_columns: Sequence[bool], predictions: pd.DataFrame):
    """One Parquet table (pyarrow) with its labels and mask relabelled; the schema and its
    metadata (the dataset spec in the footer) are kept. Returns (table, entries relabelled per label)."""
    import pyarrow as pa

    labels = np.asarray(table.column("labels").to_pylist(), dtype=np.float32).reshape(table.num_rows, -1)
    mask = np.asarray(table.column(LABEL_MASK_COLUMN).to_pylist(), dtype=np.float32).reshape(labels.shape)
    image_ids = pd.Series(table.column("image_id").to_pylist())
    needs = ((mask == 0.0) & np.asarray(relabel_columns)[None, :]).any(axis=1)
    lacking = image_ids[needs & ~image_ids.isin(predictions.index)]
    if len(lacking):
        raise ValueError(f"{len(lacking)} rows with uncertain labels to relabel have no prediction, e.g. "
                         f"{list(lacking[:3])}; predict every row of the split first")
    probabilities = predictions.reindex(image_ids).to_numpy(dtype=np.float32)
    new_labels, new_mask = relabel_uncertain(labels, mask, probabilities, relabel_columns)
    for name, values in (("labels", new_labels), (LABEL_MASK_COLUMN, new_mask)):
        position = table.schema.get_field_index(name)
        table = table.set_column(position, table.schema.field(position),
                                 pa.array(values.tolist(), type=table.schema.field(position).type))
    return table, (new_mask - mask).sum(axis=0)


def relabel_dataset(dataset: str | Path, prediction_csvs: Sequence[str | Path], output: str | Path,
                    splits: Sequence[str] = ("train",), overwrite: bool = False) -> dict:
    """Write `output`: `dataset` with its U-SelfTrained labels relabelled in `splits` (other
    splits and every other column copied as they are), as a new version of `output` (etl/versions.py)."""
    import pyarrow.parquet as pq

    read, output = versions.resolve(dataset), Path(output).resolve()
    dataset = read.path
    spec = read_dataset_spec(dataset)
    relabel_columns = [spec.label_policies.get(name) == U_SELFTRAINED for name in spec.label_names]
    if not any(relabel_columns) or not spec.has_mask:
        raise ValueError(f"{dataset} has no label under {U_SELFTRAINED} (policies: {spec.label_policies or 'none'}); "
                         "run the ETL with --uncertainty-policy naming it first")
    if versions.has_data(output) and not overwrite:
        raise FileExistsError(f"{output} holds a dataset; pass --overwrite to write a new version of it")
    predictions = read_predictions(prediction_csvs, spec.label_names)
    relabelled = {name: 0 for name, chosen in zip(spec.label_names, relabel_columns) if chosen}
    with versions.writing(output) as (version, staging):
        versions.copy_unchanged(dataset, staging, {folder.name for folder in dataset.glob("split=*")})
        for split_folder in sorted(dataset.glob("split=*")):
            (staging / split_folder.name).mkdir()
            relabel_here = split_folder.name in {f"split={split}" for split in splits}
            for file in sorted(split_folder.glob("*.parquet")):  # not Spark's .crc files: they would not match
                source = pq.ParquetFile(file)
                table = source.read()
                if relabel_here and table.num_rows:
                    table, counts = relabel_table(table, relabel_columns, predictions)
                    for name, count in zip(spec.label_names, counts):
                        if name in relabelled:
                            relabelled[name] += int(count)
                rows_per_group = source.metadata.row_group(0).num_rows if source.metadata.num_row_groups else 0
                pq.write_table(table, staging / split_folder.name / file.name, row_group_size=max(rows_per_group, 1),
                               compression="snappy")
        summary = {"dataset": str(dataset), "dataset_version": read.version,
                   "predictions": [str(p) for p in prediction_csvs], "splits": list(splits),
                   "entries_relabelled": relabelled}
        (staging / "_relabel.json").write_text(json.dumps(summary, indent=2))
        versions.commit(output, version, {"created": versions.now_utc().isoformat(), "derived_from": summary})
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset folder written by etl/preprocess.py")
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="training's predictions_<stage>_<split>.csv of the first (U-Ignore) model")
    parser.add_argument("--output", required=True, help="dataset root: the relabelled dataset becomes its current "
                                                         "version")
    parser.add_argument("--splits", default="train", help="comma-separated splits to relabel (default train)")
    parser.add_argument("--overwrite", action="store_true", help="--output holds a dataset: add a new version")
    args = parser.parse_args(argv)
    try:
        summary = relabel_dataset(args.dataset, args.predictions, args.output,
                                  [s.strip() for s in args.splits.split(",") if s.strip()], args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

"""CheXpert (Irvin et al. 2019): `train.csv` / `valid.csv` whose `Path` column is relative to
the folder that holds `CheXpert-v1.0(-small)/`, which is the data root.

Columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then 14 observations valued 1 / 0 / -1
(uncertain) / blank (not mentioned). The raw values stay in the manifest (`raw_labels`);
`labels` (and `label_mask`) come from an uncertainty policy (etl/uncertainty.py). The
patient id is in the path (`.../patient00001/study1/view1_frontal.jpg`). valid.csv, when
present, is the test split (the official test set is not public) and train.csv is divided
into train/val by patient; without valid.csv the seeded split makes all three.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.schema import LABEL_MASK_COLUMN
from cxr_pipeline.etl.sources.manifest import MANIFEST_COLUMNS, reject_reasons, rejects_frame
from cxr_pipeline.etl.sources.nih import parse_age
from cxr_pipeline.etl.uncertainty import (BLANK_POLICIES, MASKING_POLICIES, U_IGNORE, U_ZEROS, PolicyManifest, apply_policy,
                             canonical_policy, parse_policies)

DATASET = "chexpert"
# The 14 observations, in the order of the label files.
LABEL_NAMES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
PATIENT_PATTERN = r"(patient\d+)"
SEXES = {"Male": "M", "Female": "F"}  # 'Unknown' and blanks are null
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_label_csv(data_root: Path, name: str) -> Path | None:
    """DATA_ROOT/name(.gz) or DATA_ROOT/CheXpert-v1.0*/name(.gz), as the download unpacks."""
    for folder in (data_root, *sorted(data_root.glob("CheXpert-v1.0*"))):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def parse_raw_labels(table: pd.DataFrame) -> tuple[np.ndarray, pd.Series]:
    """The 14 observation columns -> (N, 14) float array of 1/0/-1/NaN, and per row the
    unreadable entries as 'Label=value' text ('' when all are readable)."""
    missing = [name for name in LABEL_NAMES if name not in table.columns]
    if missing:
        raise ValueError(f"CheXpert label table lacks columns {missing}; is it train.csv or valid.csv?")
    text = table[list(LABEL_NAMES)]
    raw = text.apply(pd.to_numeric, errors="coerce")
    unreadable = ~raw.isin([1.0, 0.0, -1.0]) & (text != "")
    unreadable &= text.where(unreadable, "").apply(lambda column: column.str.strip()) != ""  # ' ' is blank
    problems = pd.Series("", index=table.index)
    for name in LABEL_NAMES:
        bad = unreadable[name]
        problems[bad] = problems[bad] + f"{name}=" + text.loc[bad, name] + " "
    raw = raw.where(~unreadable)
    return raw.to_numpy(dtype=np.float64), problems.str.strip()


def view_positions(table: pd.DataFrame) -> pd.Series:
    """AP/PA (LL, RL) for frontal images, LATERAL for lateral ones (their AP/PA is blank)."""
    lateral = table["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    return table["AP/PA"].str.strip().str.upper().where(~lateral, "LATERAL").replace("", None)


def escapes_root(normalised_paths: pd.Series) -> pd.Series:
    """Absolute paths and paths that climb out with '..' (the lexical check of resolve_inside,
    vectorised: the label table has 223k rows)."""
    return normalised_paths.str.startswith(("/", "../")) | (normalised_paths == "..")


def present_images(data_root: Path) -> set[str]:
    """Relative paths of the image files below the data root."""
    found = set()
    for folder, _, files in os.walk(data_root):
        relative = os.path.relpath(folder, data_root)
        found.update(os.path.normpath(os.path.join(relative, name)) for name in files
                     if name.lower().endswith(IMAGE_SUFFIXES))
    return found


def read_tables(data_root: Path, labels_csv, valid_csv) -> pd.DataFrame:
    """train.csv rows (official 'train_val') then valid.csv rows ('test'), with their 1-based row."""
    train = Path(labels_csv) if labels_csv else find_label_csv(data_root, "train.csv")
    if train is None:
        raise FileNotFoundError(f"no train.csv in {data_root} or {data_root}/CheXpert-v1.0*/; "
                                "pass --labels-csv with the CheXpert label table")
    valid = Path(valid_csv) if valid_csv else find_label_csv(data_root, "valid.csv")
    frames = []
    for path, official in ((train, "train_val"), (valid, "test")):
        if path is not None:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            frames.append(frame.assign(source_row=range(1, len(frame) + 1), official_split=official,
                                       source_file=path.name))
    table = pd.concat(frames, ignore_index=True)
    if valid is None:  # no test list: the seeded split makes train, val and test
        table["official_split"] = None
    return table


def build_manifest(data_root: str | Path, labels_csv: str | Path | None = None, valid_csv: str | Path | None = None,
                   frontal_only: bool = False, uncertainty_policy: str | dict | None = None,
                   blank_policy: str = U_ZEROS, check_images: bool = True) -> PolicyManifest:
    """`frontal_only` leaves lateral images out of the manifest (a selection, not a reject).
    `check_images=False` keeps rows whose image file is absent (label-only analyses)."""
    data_root = Path(data_root)
    table = read_tables(data_root, labels_csv, valid_csv)
    if frontal_only:
        table = table[table["Frontal/Lateral"].str.strip().str.lower() == "frontal"].reset_index(drop=True)
    policies = parse_policies(uncertainty_policy, LABEL_NAMES)
    blank_policy = canonical_policy(blank_policy, BLANK_POLICIES)
    raw, unreadable = parse_raw_labels(table)
    labels, mask = apply_policy(raw, policies, blank_policy)
    paths = table["Path"].str.strip()
    rows = pd.DataFrame({
        "image_id": paths,
        "patient_id": paths.str.extract(PATIENT_PATTERN, expand=False),
        "source_path": paths.map(os.path.normpath),
        "source_row": table["source_row"],
        "labels": labels.tolist(),
        "age": parse_age(table["Age"]),
        "sex": table["Sex"].str.strip().map(SEXES),
        "view_position": view_positions(table),
        "official_split": table["official_split"],
    })[MANIFEST_COLUMNS]
    rows["raw_labels"] = raw.tolist()
    if any(p in MASKING_POLICIES for p in policies) or blank_policy == U_IGNORE:
        rows[LABEL_MASK_COLUMN] = mask.tolist()

    present = present_images(data_root) if check_images else None
    checks = [
        (unreadable != "", "unknown_label", "label values not 1, 0, -1 or blank: " + unreadable),
        (~rows["source_path"].isin(present) if check_images else None, "image_missing",
         "image file not found below " + str(data_root)),
        (rows["patient_id"].isna(), "missing_patient_id", f"no {PATIENT_PATTERN} in the path: the row cannot be split"),
        (escapes_root(rows["source_path"]), "path_escapes_root", "image path points outside the data root"),
        (rows["image_id"].duplicated(keep="first"), "duplicate_image_id", "path listed earlier in the label tables"),
    ]
    reasons, details = reject_reasons(rows.index, checks)
    bad = reasons.notna()
    if check_images and bad.all() and len(rows):
        hint_paths_relative_to(data_root, rows["source_path"].iloc[0])
    rejects = rejects_frame([
        {"image_id": image_id, "source_path": image_id, "source_row": row, "reason": reason,
         "detail": f"{detail} ({source_file} row {row})"}
        for image_id, row, reason, detail, source_file in zip(
            rows.loc[bad, "image_id"], rows.loc[bad, "source_row"], reasons[bad], details[bad],
            table.loc[bad, "source_file"])
    ])
    return PolicyManifest(DATASET, LABEL_NAMES, rows[~bad].reset_index(drop=True), rejects,
                          label_policies=dict(zip(LABEL_NAMES, policies)))


def hint_paths_relative_to(data_root: Path, first_path: str) -> None:
    """No image at all: if the root is the CheXpert folder itself, say which folder to pass."""
    top = Path(first_path).parts[0]
    if data_root.name == top and (data_root.parent / first_path).exists():
        raise FileNotFoundError(f"paths in the CheXpert label table start with {top}/: pass --data-root "
                                f"{data_root.parent} (the folder that holds {top}/), not {data_root}")

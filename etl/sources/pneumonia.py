"""Pediatric pneumonia (Kermany et al. 2018): `train|val|test/NORMAL|PNEUMONIA/*.jpeg`.

The patient id is in the file name: `person1000_bacteria_2931.jpeg` -> `person1000`,
`IM-0011-0001-0002.jpeg` -> `IM-0011`, `NORMAL2-IM-0007-0001.jpeg` -> `NORMAL2-IM-0007`.
The `test` folder is the official test split; `train` and the tiny `val` folder are
divided into train/val by patient.

The download numbers patients per folder: `test/PNEUMONIA/person1_virus_6.jpeg` is another
child than the `person1` of `train/` (`val/` was carved from train and shares its numbering).
So patient ids are namespaced by that numbering, `train/person1` and `test/person1`, and no
official test image ever collides with a training patient.
"""
from __future__ import annotations

import re
import logging
from pathlib import Path

import pandas as pd

from cxr_pipeline.etl.sources.manifest import MANIFEST_COLUMNS, Manifest, rejects_frame

DATASET = "pneumonia"
LABEL_NAMES = ("Pneumonia",)
CLASS_FOLDERS = {"NORMAL": 0.0, "PNEUMONIA": 1.0}
OFFICIAL_FOLDERS = {"train": "train_val", "val": "train_val", "test": "test"}
# The folders that share one patient numbering, and the prefix of their namespaced ids.
PATIENT_NAMESPACES = {"train": "train", "val": "train", "test": "test"}
PATIENT_PATTERN = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
log = logging.getLogger("etl")


def patient_id_from_name(name: str) -> str | None:
    match = PATIENT_PATTERN.match(name)
    return (match.group(1) or match.group(2)) if match else None


def build_manifest(data_root: str | Path) -> Manifest:
    data_root = Path(data_root)
    found = [
        (folder, label_folder, path)
        for folder in OFFICIAL_FOLDERS
        for label_folder in CLASS_FOLDERS
        for path in sorted((data_root / folder / label_folder).glob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise FileNotFoundError(
            f"no images in {data_root}/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/: "
            "point --data-root at the folder that holds train/ (and test/)"
        )
    has_test = any(folder == "test" for folder, _, _ in found)
    records, rejects = [], []
    for source_row, (folder, label_folder, path) in enumerate(found, start=1):
        relative = str(path.relative_to(data_root))
        patient = patient_id_from_name(path.name)
        if patient is None:
            rejects.append({"image_id": relative, "source_path": relative, "source_row": source_row,
                            "reason": "unknown_patient",
                            "detail": f"file name {path.name!r} does not match {PATIENT_PATTERN.pattern}"})
            continue
        records.append({
            "image_id": relative, "patient_id": f"{PATIENT_NAMESPACES[folder]}/{patient}", "source_path": relative,
            "source_row": source_row,
            "labels": [CLASS_FOLDERS[label_folder]], "age": None, "sex": None, "view_position": None,
            # Without an official test folder, the seeded split makes all three splits.
            "official_split": OFFICIAL_FOLDERS[folder] if has_test else None,
        })
    rows = pd.DataFrame(records, columns=MANIFEST_COLUMNS).astype({"age": "Int32"})
    log.info("pneumonia: %d patient ids namespaced by folder numbering (%s); %d bare ids occur in more than one "
             "numbering and are different children", rows["patient_id"].nunique(),
             ", ".join(sorted(set(PATIENT_NAMESPACES.values()))), colliding_ids(rows["patient_id"]))
    return Manifest(DATASET, LABEL_NAMES, rows, rejects_frame(rejects))


def colliding_ids(namespaced: pd.Series) -> int:
    """Bare patient ids that occur under more than one namespace ('train/person1', 'test/person1')."""
    parts = namespaced.drop_duplicates().str.split("/", n=1)
    return int(parts.str[0].groupby(parts.str[1].values).nunique().gt(1).sum())

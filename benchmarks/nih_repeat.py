"""A data root of the real NIH PNGs repeated to N rows (symlinks, distinct ids and patients).

Two label tables can be repeated:

* the 100-row sample (`Data_Entry_sample.csv`, default): row i is copy i // 100 of sample row
  i % 100, named `{copy:03d}{Image Index}`, patient `i` (one image per patient, as in the sample);
* the full table (`full_table=True`, `Data_Entry_2017_v2020.csv.gz`, 112,120 rows): row i is copy
  i // 112,120 of table row i % 112,120, patient `copy * 100,000 + Patient ID`, so the real
  images-per-patient structure (1 to 184) is kept and copies never share a patient. Its images
  are the sample's PNGs in turn (only the sample's pixels are on disk): real decode cost,
  labels that do not describe the pixels.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

SAMPLE_TABLE = "Data_Entry_sample.csv"
FULL_TABLE = "Data_Entry_2017_v2020.csv.gz"
PATIENT_STRIDE = 100_000  # above NIH's largest Patient ID (30,805): copies never share a patient


def build(source: Path, target: Path, rows: int, full_table: bool = False) -> Path:
    """`target` gets images/ (symlinks) and Data_Entry_2017.csv with `rows` rows."""
    sample = pd.read_csv(source / SAMPLE_TABLE)
    table = pd.read_csv(source / FULL_TABLE) if full_table else sample
    position = pd.RangeIndex(rows)
    copies = table.iloc[position % len(table)].reset_index(drop=True)
    copy = pd.Series(position // len(table)).map("{:03d}".format)
    originals = copies["Image Index"] if not full_table else sample["Image Index"].iloc[position % len(sample)]
    copies["Image Index"] = copy + copies["Image Index"]
    copies["Patient ID"] = (position // len(table)) * PATIENT_STRIDE + copies["Patient ID"] if full_table else position
    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    present = set(os.listdir(images))
    sources = (source / "images").resolve()
    for name, original in zip(copies["Image Index"], originals):
        if name not in present:
            os.symlink(sources / original, images / name)
    copies.to_csv(target / "Data_Entry_2017.csv", index=False)
    return target

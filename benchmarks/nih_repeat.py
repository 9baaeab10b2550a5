"""A data root of the real NIH PNGs repeated to N rows (symlinks, distinct ids and patients)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def build(source: Path, target: Path, rows: int) -> Path:
    """`target` gets images/ (symlinks) and Data_Entry_2017.csv with `rows` rows."""
    table = pd.read_csv(source / "Data_Entry_sample.csv")
    (target / "images").mkdir(parents=True, exist_ok=True)
    copies = []
    for index in range(rows):
        row = table.iloc[index % len(table)].copy()
        name = f"{index // len(table):03d}{row['Image Index']}"
        link = target / "images" / name
        if not link.exists():
            os.symlink((source / "images" / row["Image Index"]).resolve(), link)
        row["Image Index"], row["Patient ID"] = name, index
        copies.append(row)
    pd.DataFrame(copies).to_csv(target / "Data_Entry_2017.csv", index=False)
    return target

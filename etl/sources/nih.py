"""NIH ChestX-ray14: `Data_Entry_2017*.csv`, PNGs anywhere below the data root, and the
optional official `train_val_list.txt` / `test_list.txt`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_pipeline.etl.sources.manifest import (MANIFEST_COLUMNS, Manifest, index_images, reject_reasons, rejects_frame,
                                              resolve_inside)

DATASET = "nih"
# The order of CheXNet (Rajpurkar et al. 2017) and of the NIH paper's tables.
LABEL_NAMES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# The 15-class option: "No Finding" as a class of its own, set when no other label is.
LABEL_NAMES_WITH_NO_FINDING = LABEL_NAMES + (NO_FINDING,)
# BBox_List_2017.csv names Infiltration "Infiltrate".
BBOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
BBOX_COLUMNS = ["image_id", "label", "x", "y", "width", "height"]
# The label table's columns build_manifest reads (Data_Entry_2017*.csv has 11).
LABEL_TABLE_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
MAX_PLAUSIBLE_AGE = 120  # the 2017 release has a few ages up to 414 (fixed in 2020): data errors, stored as null


def find_labels_csv(data_root: Path) -> Path:
    candidates = sorted(data_root.glob("Data_Entry_2017*.csv*"))
    if not candidates:
        raise FileNotFoundError(
            f"no Data_Entry_2017*.csv in {data_root}; pass --labels-csv with the NIH label table"
        )
    return candidates[0]


def read_official_lists(data_root: Path) -> dict[str, str] | None:
    """image file name -> 'train_val' or 'test', when both official lists are present."""
    lists = {"train_val": data_root / "train_val_list.txt", "test": data_root / "test_list.txt"}
    if not all(path.exists() for path in lists.values()):
        return None
    official = {}
    for split, path in lists.items():
        for name in path.read_text().split():
            official[name] = split
    return official


def parse_labels(findings: pd.Series, no_finding_class: bool = False) -> tuple[pd.Series, pd.Series]:
    """'A|B' strings -> (multi-hot lists in LABEL_NAMES order, unknown label names or '').
    With `no_finding_class` the lists have a 15th entry, 1 when none of the 14 is set."""
    position = {name: i for i, name in enumerate(LABEL_NAMES)}
    # Parsed once per distinct text (NIH has about 800): rows with the same findings share one list, which
    # keeps a million-row manifest's labels at a pointer per row. The lists are read, never changed in place.
    parsed: dict[str, tuple[list[float], str]] = {}
    vectors, unknown = [], []
    for text in findings.fillna(""):
        if text not in parsed:
            names = [name.strip() for name in text.split("|") if name.strip() and name.strip() != NO_FINDING]
            vector = [0.0] * len(LABEL_NAMES)
            bad = []
            for name in names:
                if name in position:
                    vector[position[name]] = 1.0
                else:
                    bad.append(name)
            if no_finding_class:
                vector.append(0.0 if any(vector) else 1.0)
            parsed[text] = (vector, "|".join(bad))
        vector, bad_names = parsed[text]
        vectors.append(vector)
        unknown.append(bad_names)
    return pd.Series(vectors, index=findings.index), pd.Series(unknown, index=findings.index)


def stripped_upper(values: pd.Series) -> pd.Series:
    """values.str.strip().str.upper() with one string per distinct value (not one per row); nulls stay null."""
    mapping = {value: value.strip().upper() for value in values.unique() if isinstance(value, str)}
    return values.map(mapping).astype(object, copy=False)  # object even when every value is null, as .str gives


def parse_age(ages: pd.Series) -> pd.Series:
    """Years as nullable int; '058Y' (the 2017 release) and '58' (2020) both parse."""
    years = pd.to_numeric(ages.astype(str).str.rstrip("Yy"), errors="coerce")
    years[(years < 0) | (years > MAX_PLAUSIBLE_AGE)] = float("nan")
    return years.astype("Int32")


def escapes_root(data_root: Path, image_ids: pd.Series) -> pd.Series:
    def escapes(image_id: str) -> bool:
        try:
            resolve_inside(data_root, image_id)
            return False
        except ValueError:
            return True

    return image_ids.map(escapes)


def build_manifest(data_root: str | Path, labels_csv: str | Path | None = None, no_finding_class: bool = False,
                   check_images: bool = True) -> Manifest:
    """`check_images=False` keeps rows whose image file is absent (label-only analyses:
    etl/explore.py, etl/subsets.py); the ETL always checks."""
    data_root = Path(data_root)
    table = pd.read_csv(labels_csv or find_labels_csv(data_root), dtype=str, keep_default_na=False,
                        usecols=lambda column: column in LABEL_TABLE_COLUMNS)  # the rest is never read
    table["source_row"] = range(1, len(table) + 1)  # 1-based data row, header excluded
    index, ambiguous = index_images(data_root, (".png",))
    official = read_official_lists(data_root)

    labels, unknown = parse_labels(table["Finding Labels"], no_finding_class)
    rows = pd.DataFrame({
        "image_id": table["Image Index"],
        "patient_id": table["Patient ID"].str.strip(),
        "source_path": table["Image Index"].map(index),
        "source_row": table["source_row"],
        "labels": labels,
        "age": parse_age(table["Patient Age"]),
        "sex": stripped_upper(table["Patient Gender"]).where(lambda s: s.isin(["M", "F"])),
        "view_position": stripped_upper(table["View Position"]),
        "official_split": table["Image Index"].map(official) if official else None,
    })[MANIFEST_COLUMNS]

    checks = [
        (rows["official_split"].isna() if official else None, "not_in_official_lists",
         "image is in neither train_val_list.txt nor test_list.txt"),
        (unknown != "", "unknown_label", "unknown label(s): " + unknown.where(unknown != "")),  # no string per good row
        (rows["image_id"].isin(ambiguous), "ambiguous_file", "more than one file with this name below the data root"),
        (rows["source_path"].isna() if check_images else None, "image_missing",
         "image file not found below " + str(data_root)),
        (rows["patient_id"] == "", "missing_patient_id", "no Patient ID: the row cannot be split by patient"),
        (escapes_root(data_root, rows["image_id"]), "path_escapes_root", "image id points outside the data root"),
        (rows["image_id"].duplicated(keep="first"), "duplicate_image_id", "image id listed earlier in the CSV"),
    ]
    reasons, details = reject_reasons(rows.index, checks)
    bad = reasons.notna()
    rejects = [
        {"image_id": r.image_id, "source_path": r.source_path if isinstance(r.source_path, str) else r.image_id,
         "source_row": r.source_row, "reason": reason, "detail": detail}
        for r, reason, detail in zip(rows[bad].itertuples(), reasons[bad], details[bad])
    ]
    listed = set(table["Image Index"])
    rejects += [
        {"image_id": name, "source_path": path, "source_row": None, "reason": "unlisted_image",
         "detail": "image file below the data root has no row in the label table"}
        for name, path in sorted((name, path) for name, path in index.items() if name not in listed)
    ]
    warnings = field_warnings(table, rows)
    del table, index, listed, checks, reasons, details  # freed before the kept rows are copied (driver peak memory)
    label_names = LABEL_NAMES_WITH_NO_FINDING if no_finding_class else LABEL_NAMES
    return Manifest(DATASET, label_names, rows[~bad].reset_index(drop=True), rejects_frame(rejects),
                    warnings[warnings["image_id"].isin(rows.loc[~bad, "image_id"])].reset_index(drop=True))


def field_warnings(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Values kept as null rather than rejecting an otherwise good image."""
    frames = []
    for field, raw, parsed in (("age", "Patient Age", "age"), ("sex", "Patient Gender", "sex")):
        bad = rows[parsed].isna() & (table[raw].str.strip() != "")
        frames.append(pd.DataFrame({"image_id": rows.loc[bad, "image_id"], "source_row": rows.loc[bad, "source_row"],
                                    "field": field, "value": table.loc[bad, raw]}))
    return pd.concat(frames, ignore_index=True)


def read_bounding_boxes(path: str | Path) -> pd.DataFrame:
    """BBox_List_2017.csv -> image_id, label (as in LABEL_NAMES), x, y, width, height in pixels of
    the 1024x1024 original. The file's header splits 'Bbox [x,y,w,h]' over four columns."""
    table = pd.read_csv(path, header=0, usecols=range(6), names=BBOX_COLUMNS)
    table["label"] = table["label"].str.strip().replace(BBOX_LABEL_ALIASES)
    unknown = sorted(set(table["label"]) - set(LABEL_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown bounding-box labels {unknown}; expected names from {LABEL_NAMES}")
    return table


def side_tables(data_root: str | Path) -> dict[str, pd.DataFrame]:
    """Tables written beside the dataset: the bounding boxes, when BBox_List_2017.csv* is in the data root."""
    found = sorted(Path(data_root).glob("BBox_List_2017*.csv*"))
    return {"bounding_boxes": read_bounding_boxes(found[0])} if found else {}

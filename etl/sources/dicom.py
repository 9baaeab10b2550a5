"""A folder of DICOM files (`*.dcm` anywhere below the data root) plus a label CSV.

The CSV (`--labels-csv`, default DATA_ROOT/labels.csv) has one key column, `SOPInstanceUID`
or `file` (path relative to the data root, or a file name that is unique below it), and
one column per label valued 1 / 0 / blank (blank is negative). The label names are the
CSV's other columns, in their order.

Nothing that identifies a patient reaches the manifest (nor, so, the Parquet): the patient
id is a keyed one-way hash of PatientID (HMAC-SHA256 with the secret in the environment
variable CXR_PATIENT_ID_KEY, never in a flag or config, which are written next to the
output), the image id is the file's path, and of the header only age in years, sex and
view position are kept. UIDs, names, dates and other IDs are used to join and then dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import pandas as pd

from cxr_pipeline.etl.sources.manifest import MANIFEST_COLUMNS, Manifest, reject_reasons, rejects_frame

DATASET = "dicom"
KEY_COLUMNS = ("SOPInstanceUID", "file")
PATIENT_ID_KEY_VARIABLE = "CXR_PATIENT_ID_KEY"
HEADER_TAGS = ["PatientID", "SOPInstanceUID", "PatientAge", "PatientBirthDate", "StudyDate", "PatientSex",
               "ViewPosition"]
AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
log = logging.getLogger(__name__)


def hash_patient_id(patient_id: str, key: str) -> str:
    """A stable pseudonym: equal ids give equal hashes; without the key it cannot be reversed
    by hashing candidate ids (plain SHA-256 of a medical record number can)."""
    return hmac.new(key.encode(), patient_id.strip().encode(), hashlib.sha256).hexdigest()[:32]


def age_in_years(text) -> int | None:
    """DICOM Age String '045Y', '006M', '010W', '003D' -> whole years; None if absent or unreadable."""
    text = text.strip().upper() if isinstance(text, str) else ""
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in AGE_UNITS:
        return None
    return int(int(text[:3]) * AGE_UNITS[text[3]])


def age_from_dates(birth_date, study_date) -> int | None:
    """Whole years between two DICOM dates 'YYYYMMDD' (when PatientAge is absent); None if unreadable."""
    born, seen = (pd.to_datetime(d, format="%Y%m%d", errors="coerce") if isinstance(d, str) else pd.NaT
                  for d in (birth_date, study_date))
    if pd.isna(born) or pd.isna(seen) or seen < born:
        return None
    return seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def header_age(patient_age, birth_date, study_date) -> int | None:
    """PatientAge, else the years from PatientBirthDate to StudyDate (the dates themselves are not kept)."""
    years = age_in_years(patient_age)
    return years if years is not None else age_from_dates(birth_date, study_date)


def read_headers(data_root: Path, relative_paths: list[str]) -> pd.DataFrame:
    """The few header fields needed, per file (no pixels read); `error` says why a file's
    header is unreadable."""
    import pydicom

    records = []
    for relative in relative_paths:
        try:
            ds = pydicom.dcmread(data_root / relative, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            values = {tag: str(ds.get(tag, "") or "") for tag in HEADER_TAGS}
            records.append({"file": relative, "error": None, **values})
        except Exception as exc:  # pydicom raises several types for unreadable files
            records.append({"file": relative, "error": f"unreadable DICOM header: {exc}"})
    return pd.DataFrame(records, columns=["file", "error", *HEADER_TAGS])


def parse_label_values(table: pd.DataFrame, label_names: list[str]) -> tuple[pd.Series, pd.Series]:
    """1 / 0 / blank columns -> (label lists in `label_names` order, 'Label=value' problems or '')."""
    values = table[label_names].apply(pd.to_numeric, errors="coerce")
    unreadable = ~values.isin([0.0, 1.0]) & (table[label_names].apply(lambda c: c.str.strip()) != "")
    problems = pd.Series("", index=table.index)
    for name in label_names:
        problems[unreadable[name]] += f"{name}=" + table.loc[unreadable[name], name] + " "
    lists = values.fillna(0.0).where(~unreadable, 0.0).to_numpy(dtype=float).tolist()
    return pd.Series(lists, index=table.index, dtype=object), problems.str.strip()


def list_dicom_files(data_root: Path) -> list[str]:
    """Paths, relative to the data root, of every *.dcm file below it (names often repeat
    across study folders, so files are told apart by path)."""
    return sorted(
        os.path.relpath(os.path.join(folder, name), data_root)
        for folder, _, names in os.walk(data_root) for name in names if name.lower().endswith(".dcm")
    )


def build_manifest(data_root: str | Path, labels_csv: str | Path | None = None) -> Manifest:
    data_root = Path(data_root)
    labels_csv = Path(labels_csv) if labels_csv else data_root / "labels.csv"
    if not labels_csv.exists():
        raise FileNotFoundError(f"no label table {labels_csv}; pass --labels-csv with a CSV keyed by "
                                f"{' or '.join(KEY_COLUMNS)}")
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    keys = [column for column in KEY_COLUMNS if column in table.columns]
    if len(keys) != 1:
        raise ValueError(f"{labels_csv} must have exactly one key column of {KEY_COLUMNS}, found {keys}")
    key = keys[0]
    label_names = [column for column in table.columns if column != key]
    if not label_names:
        raise ValueError(f"{labels_csv} has no label columns besides {key!r}")
    table["source_row"] = range(1, len(table) + 1)
    secret = os.environ.get(PATIENT_ID_KEY_VARIABLE, "")
    if not secret:
        log.warning("%s is not set: patient ids are hashed without a secret key", PATIENT_ID_KEY_VARIABLE)

    files = list_dicom_files(data_root)
    headers = read_headers(data_root, files)
    headers["patient_id"] = headers["PatientID"].map(lambda pid: hash_patient_id(pid, secret) if pid else None)
    if key == "SOPInstanceUID":
        headers["join_key"] = headers["SOPInstanceUID"].fillna("")
        wanted = table[key].str.strip()
    else:  # a path relative to the data root, or a file name found once below it
        headers["join_key"] = headers["file"]
        names = pd.Series([os.path.basename(f) for f in files], dtype=str)
        unique_names = dict(zip(names[~names.duplicated(keep=False)], pd.Series(files)[~names.duplicated(keep=False)]))
        wanted = table[key].str.strip().map(lambda name: unique_names.get(name, os.path.normpath(name) if name else ""))
    repeated = headers["join_key"].duplicated(keep=False) & (headers["join_key"] != "")
    usable = headers[~repeated & (headers["join_key"] != "")]
    matched = pd.DataFrame({"join_key": wanted}).merge(usable, how="left", on="join_key")
    ambiguous = wanted.isin(headers.loc[repeated, "join_key"])
    if key == "file":
        ambiguous |= table[key].str.strip().isin(names[names.duplicated(keep=False)])

    labels, problems = parse_label_values(table, label_names)
    rows = pd.DataFrame({
        "image_id": matched["file"],
        "patient_id": matched["patient_id"],
        "source_path": matched["file"],
        "source_row": table["source_row"],
        "labels": labels,
        "age": pd.Series(map(header_age, matched["PatientAge"], matched["PatientBirthDate"], matched["StudyDate"]),
                         dtype="Int32"),
        "sex": matched["PatientSex"].str.strip().str.upper().where(lambda s: s.isin(["M", "F"])),
        "view_position": matched["ViewPosition"].str.strip().str.upper().replace("", None),
        "official_split": None,
    })[MANIFEST_COLUMNS]

    checks = [
        (problems != "", "unknown_label", "label values not 1, 0 or blank: " + problems),
        (rows["patient_id"].isna(), "missing_patient_id",
         "no PatientID in the header: the row cannot be split by patient"),
        (matched["error"].notna(), "not_an_image", matched["error"]),
        (rows["image_id"].isna(), "image_missing", f"no readable .dcm file below {data_root} has this {key}"),
        (ambiguous, "ambiguous_file", f"more than one .dcm file below the data root has this {key}"),
        (table[key].duplicated(keep="first") & (table[key] != ""), "duplicate_image_id",
         f"{key} listed earlier in the CSV"),
    ]
    reasons, details = reject_reasons(rows.index, checks)
    bad = reasons.notna()
    # A row that matched no file is named by its CSV row: its key may be a UID, which must not be copied.
    rejects = [
        {"image_id": file if isinstance(file, str) else f"{labels_csv.name} row {row}",
         "source_path": file if isinstance(file, str) else None, "source_row": row, "reason": reason, "detail": detail}
        for file, row, reason, detail in zip(rows.loc[bad, "image_id"], rows.loc[bad, "source_row"],
                                             reasons[bad], details[bad])
    ]
    listed = set(matched["file"].dropna())
    rejects += [
        {"image_id": file, "source_path": file, "source_row": None,
         "reason": "not_an_image" if isinstance(error, str) else "unlisted_image",
         "detail": error if isinstance(error, str) else "DICOM file below the data root has no row in the label table"}
        for file, error in zip(headers["file"], headers["error"]) if file not in listed
    ]
    return Manifest(DATASET, tuple(label_names), rows[~bad].reset_index(drop=True), rejects_frame(rejects))

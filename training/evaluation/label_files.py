"""Read a labels CSV and a predictions CSV from any tool and line them up, label by label.

Labels files come as they are distributed:
- wide: an id column and one column per label holding 1/0 (CheXpert's `valid.csv`, with
  `Path`; -1 "uncertain" and blanks are unknown for that label and counted, never guessed);
- NIH's `Data_Entry_2017*.csv`: `Image Index`, `Finding Labels` ('A|B', 'No Finding') and
  `Patient ID`, expanded to the 14 findings.

Columns are matched by label name whatever the spelling (`Pleural_Thickening`,
`pleural thickening`; NIH `Effusion` = CheXpert `Pleural Effusion`). Score columns are named by a
template: `{label}` (the bare name), `prob_{label}` (the public CheXNet reproductions),
`{label}_prob`, or one the caller gives (`{label}_score`); without one, the known templates are
tried and the one that matches most labels is used and named in a note. Anything that cannot be
matched is an error that says what, or a count that is printed; no row or label is dropped
silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.etl.sources import chexpert, nih
from cxr_pipeline.training.serving.predictions import (DECISION_SUFFIX, ERROR_COLUMN, IDENTITY_COLUMNS,
                                                       PREVALENCE_COLUMN, SCORED_AT)

ID_COLUMNS = ("image_id", "Image Index", "Path", "path", "image", "filename")
PATIENT_COLUMNS = ("patient_id", "Patient ID", "PatientID", "patient")
NIH_FINDINGS_COLUMN = "Finding Labels"
# spellings of one finding in different datasets, by canonical key (see `canonical`)
ALIASES = {"effusion": "pleuraleffusion", "pleuralthickening": "pleuralthickening", "infiltrate": "infiltration"}


LABEL_FIELD = "{label}"
# score column templates tried when none is given: decorated ones first, so that in one file holding truth
# (`Pneumonia`) and scores (`Pneumonia_prob`) the scores win a tie
KNOWN_TEMPLATES = ("prob_{label}", "{label}_prob", LABEL_FIELD)


def _spelling(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def canonical(name: str) -> str:
    """'Pleural_Thickening', 'pleural thickening' -> 'pleuralthickening'; aliases folded."""
    key = _spelling(name)
    return ALIASES.get(key, key)


def check_template(template: str) -> str:
    """A score column template names the label once: 'prob_{label}', '{label}_score'."""
    if template.count(LABEL_FIELD) != 1 or re.search(r"[{}]", template.replace(LABEL_FIELD, "")):
        raise SystemExit(f"score column template {template!r} must hold {LABEL_FIELD} once and no other braces, "
                         "e.g. 'prob_{label}' or '{label}_score'")
    return template


def template_label(column: str, template: str) -> str | None:
    """The canonical label a score column names under `template` (any spelling of its prefix, suffix and
    label: 'Prob-Pleural_Effusion' under 'prob_{label}' -> 'pleuraleffusion'), or None if it does not fit."""
    prefix, suffix = (_spelling(part) for part in template.split(LABEL_FIELD))
    key = _spelling(column)
    if len(key) <= len(prefix) + len(suffix) or not (key.startswith(prefix) and key.endswith(suffix)):
        return None
    middle = key[len(prefix): len(key) - len(suffix)]
    return ALIASES.get(middle, middle)


@dataclass
class Aligned:
    """Truth and scores of the rows and labels present in both files."""

    image_ids: list[str]
    patient_ids: np.ndarray
    label_names: list[str]
    truth: np.ndarray  # (N, L): 1, 0 or NaN (unknown)
    scores: np.ndarray  # (N, L) float
    notes: list[str] = field(default_factory=list)  # counts of what was left out, printed and kept in reports
    has_patients: bool = True


def read_csv(path: str | Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None


def id_column(frame: pd.DataFrame, path) -> str:
    for name in ID_COLUMNS:
        if name in frame.columns:
            return name
    raise SystemExit(f"{path} has no image id column; name one of {list(ID_COLUMNS)}")


def read_labels(path: str | Path, template: str | None = None) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(frame indexed by image id with `patient_id` and one float column per label, label names,
    notes). Truth values are 1, 0 or NaN. Score columns of a file holding both are not labels: those that
    fit `template` (not the bare `{label}`), or without one, those that fit a known decorated template and
    name another column's label (`Pneumonia_prob` beside `Pneumonia`)."""
    frame = read_csv(path)
    ids = id_column(frame, path)
    notes = []
    if NIH_FINDINGS_COLUMN in frame.columns:
        vectors, unknown = nih.parse_labels(frame[NIH_FINDINGS_COLUMN])
        if (unknown != "").any():
            bad = unknown[unknown != ""]
            raise SystemExit(f"{path}: {len(bad)} rows name findings outside NIH's 14, e.g. {bad.iloc[0]!r} on "
                             f"row {bad.index[0] + 2}")
        truth = pd.DataFrame(vectors.tolist(), columns=list(nih.LABEL_NAMES), index=frame.index)
        label_names = list(nih.LABEL_NAMES)
    else:
        label_names = [c for c in frame.columns if not _is_metadata(c) and not _is_score(c, frame.columns, template)]
        text = frame[label_names].apply(lambda column: column.str.strip())
        truth = text.apply(pd.to_numeric, errors="coerce")
        unreadable = truth.isna() & (text != "")
        if unreadable.any().any():
            column = unreadable.any().idxmax()
            row = unreadable[column].idxmax()
            raise SystemExit(f"{path}: {int(unreadable.sum().sum())} label values are not numbers, e.g. "
                             f"{column}={text.loc[row, column]!r} on row {row + 2}; use 1, 0, -1 (uncertain) or blank")
        other = ~truth.isin([1.0, 0.0, -1.0]) & truth.notna()
        if other.any().any():
            column = other.any().idxmax()
            raise SystemExit(f"{path}: label values must be 1, 0, -1 or blank; column {column!r} holds "
                             f"{sorted(truth.loc[other[column], column].unique())[:5]}")
        uncertain, blank = int((truth == -1).sum().sum()), int(truth.isna().sum().sum())
        if uncertain or blank:
            notes.append(f"{uncertain} uncertain (-1) and {blank} blank label values count as unknown: those "
                         "images are left out of that label's figures only")
        truth = truth.where(truth != -1)
    patients = next((c for c in PATIENT_COLUMNS if c in frame.columns), None)
    if patients is None and ids == "Path":  # CheXpert: patient00001/study1/view1_frontal.jpg
        patient_ids = frame[ids].str.extract(chexpert.PATIENT_PATTERN, expand=False)
    else:
        patient_ids = frame[patients] if patients else None
    truth.insert(0, "patient_id", patient_ids if patient_ids is not None else np.nan)
    truth.index = frame[ids].rename("image_id")
    if truth.index.has_duplicates:
        duplicated = truth.index[truth.index.duplicated()]
        raise SystemExit(f"{path}: {len(duplicated)} image ids appear more than once, e.g. {duplicated[0]!r}")
    return truth, label_names, notes


def _is_metadata(column: str) -> bool:
    """Columns that are neither labels nor scores: ids, patients, CheXpert's Sex, Age,
    Frontal/Lateral and AP/PA, a split, and what prediction files hold beside the scores
    (training/serving/predictions.py)."""
    return (column in (*ID_COLUMNS, *PATIENT_COLUMNS, ERROR_COLUMN, PREVALENCE_COLUMN, *IDENTITY_COLUMNS, SCORED_AT)
            or column.endswith(DECISION_SUFFIX)
            or canonical(column) in {"sex", "age", "frontallateral", "appa", "split", "viewposition"})


def _is_score(column: str, columns, template: str | None) -> bool:
    if template is not None:
        return template != LABEL_FIELD and template_label(column, template) is not None
    keys = {canonical(c) for c in columns if c != column}
    return any(template_label(column, known) in keys for known in KNOWN_TEMPLATES if known != LABEL_FIELD)


def match_scores(columns, label_names: list[str], template: str | None = None) -> tuple[str, dict, list[str]]:
    """(template, {label: column}, columns that fit the template but name no label). Without `template`,
    the known template matching the most labels (ties: the first of KNOWN_TEMPLATES)."""
    columns = [c for c in columns if not _is_metadata(c)]
    best = None
    for candidate in [check_template(template)] if template is not None else KNOWN_TEMPLATES:
        fitting = {c: template_label(c, candidate) for c in columns}
        by_key = {}
        for column, key in fitting.items():
            if key is not None:
                by_key.setdefault(key, column)
        matched = {name: by_key[canonical(name)] for name in label_names if canonical(name) in by_key}
        unmatched = [c for c, key in fitting.items() if key is not None and c not in matched.values()]
        if best is None or len(matched) > len(best[1]):
            best = (candidate, matched, unmatched)
    return best


def read_predictions(path: str | Path, label_names: list[str],
                     template: str | None = None) -> tuple[pd.DataFrame, dict, list]:
    """(frame indexed by image id, {label: column}, notes) for the labels that have a score column under
    `template` (spelled any way; see `match_scores`); scores must be finite numbers."""
    frame = read_csv(path)
    ids = id_column(frame, path)
    notes = []
    if ERROR_COLUMN in frame.columns:  # training.predict lists unreadable images with their reason
        failed = frame[ERROR_COLUMN].str.strip() != ""
        if failed.any():
            notes.append(f"{int(failed.sum())} predicted images have an error instead of scores and are not scored, "
                         f"e.g. {frame.loc[failed, ids].iloc[0]!r}: {frame.loc[failed, ERROR_COLUMN].iloc[0]}")
        frame = frame[~failed].reset_index(drop=True)
    used, columns, unmatched = match_scores(frame.columns, label_names, template)
    if columns:
        notes.append(f"score columns matched as {used!r} ({len(columns)} labels, e.g. {next(iter(columns.values()))!r})"
                     + ("" if template else "; give --score-columns TEMPLATE to choose another"))
    if unmatched:
        notes.append(f"{len(unmatched)} prediction columns match no label and are ignored: {unmatched}")
    scores = frame[list(columns.values())].apply(lambda column: pd.to_numeric(column.str.strip(), errors="coerce"))
    bad = ~np.isfinite(scores.to_numpy(dtype=np.float64))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise SystemExit(f"{path}: {int(bad.sum())} scores are missing or not numbers, e.g. "
                         f"{scores.columns[col]}={frame.iloc[row][scores.columns[col]]!r} for image "
                         f"{frame.iloc[row][ids]!r}; every predicted image needs a score for every label")
    scores.index = frame[ids].rename("image_id")
    if scores.index.has_duplicates:
        raise SystemExit(f"{path}: image id {scores.index[scores.index.duplicated()][0]!r} appears more than once")
    return scores, columns, notes


def _match_ids(predicted: pd.Index, labelled: pd.Index) -> tuple[pd.Index, str | None]:
    """Prediction ids re-keyed to the labels' ids: exact, or by file name when paths differ
    (a predict run over a folder gives paths, NIH's table gives file names)."""
    if predicted.isin(labelled).all():
        return predicted, None
    names = pd.Index([Path(str(i)).name for i in predicted])
    label_names = pd.Index([Path(str(i)).name for i in labelled])
    if not names.has_duplicates and not label_names.has_duplicates and names.isin(label_names).sum() > \
            predicted.isin(labelled).sum():
        return pd.Index(pd.Series(labelled, index=label_names).reindex(names).fillna(
            pd.Series(predicted, index=names)).to_numpy()), "image ids matched by file name"
    return predicted, None


def align(predictions_path, labels_path, template: str | None = None) -> Aligned:
    """Truth and scores of every predicted image, for the labels both files have; score columns named by
    `template` ('prob_{label}'), or by the known template that fits most labels."""
    truth, label_names, notes = read_labels(labels_path, template)
    scores, columns, prediction_notes = read_predictions(predictions_path, label_names, template)
    notes += prediction_notes
    if not columns:
        tried = repr(template) if template else " or ".join(map(repr, KNOWN_TEMPLATES))
        raise SystemExit(f"{predictions_path} has no column matching a label of {labels_path} "
                         f"({label_names}) as {tried}; name the columns' pattern with --score-columns, "
                         "e.g. '{label}_score'")
    unscored = [n for n in label_names if n not in columns]
    if unscored:
        notes.append(f"{len(unscored)} labels of the labels file have no predictions and are not scored: {unscored}")
    keys, how = _match_ids(scores.index, truth.index)
    if how:
        notes.append(how)
    unknown = ~keys.isin(truth.index)
    if unknown.any():
        raise SystemExit(f"{int(unknown.sum())} predicted image ids are not in {labels_path}, e.g. "
                         f"{list(scores.index[unknown][:3])}: predictions and labels must name images alike")
    not_predicted = len(truth) - len(keys)
    if not_predicted:
        notes.append(f"{not_predicted} images of the labels file have no prediction and are not scored")
    rows = truth.loc[keys]
    has_patients = rows["patient_id"].notna().all() and (rows["patient_id"] != "").all()
    if not has_patients:
        notes.append("no patient id for some images: confidence intervals resample images, not patients")
    names = list(columns)
    return Aligned(
        image_ids=[str(k) for k in keys],
        patient_ids=(rows["patient_id"] if has_patients else pd.Series(keys, index=keys)).astype(str).to_numpy(),
        label_names=names, truth=rows[names].to_numpy(dtype=np.float64),
        scores=scores[[columns[n] for n in names]].to_numpy(dtype=np.float64), notes=notes, has_patients=has_patients)

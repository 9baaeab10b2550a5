"""Manifests of the NIH and pediatric pneumonia sources, on the real label tables and files."""
import pandas as pd
import pytest

from conftest import KERMANY, NIH, require
from cxr_pipeline.etl.sources import nih, pneumonia


def test_nih_sample_manifest_matches_the_csv():
    manifest = nih.build_manifest(require(NIH), NIH / "Data_Entry_sample.csv")
    csv = pd.read_csv(NIH / "Data_Entry_sample.csv").set_index("Image Index")
    assert len(manifest.rows) == 100 and manifest.rejects.empty
    for row in manifest.rows.itertuples():
        findings = set(csv.loc[row.image_id, "Finding Labels"].split("|")) - {"No Finding"}
        assert {n for n, v in zip(nih.LABEL_NAMES, row.labels) if v == 1.0} == findings
        assert row.patient_id == str(csv.loc[row.image_id, "Patient ID"])
        assert row.view_position == csv.loc[row.image_id, "View Position"]


def test_full_nih_table_without_images_reports_each_missing_image():
    table = require(NIH / "Data_Entry_2017_v2020.csv.gz")
    manifest = nih.build_manifest(NIH, table)
    assert manifest.rows_read == 112_120
    assert len(manifest.rows) == 100  # the images that are present
    assert (manifest.rejects["reason"] == "image_missing").sum() == 112_020
    assert manifest.rows["age"].max() <= nih.MAX_PLAUSIBLE_AGE


def test_unknown_label_and_duplicate_id_are_rejected_with_their_row(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"x")
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "a.png,Effusion|Pneumonitis,0,1,50,M,PA\n"
        "b.png,No Finding,0,2,abc,X,AP\n"
        "b.png,Mass,1,2,51,M,AP\n"
    )
    manifest = nih.build_manifest(tmp_path)
    rejects = manifest.rejects.set_index("source_row")
    assert rejects.loc[1, "reason"] == "unknown_label" and "Pneumonitis" in rejects.loc[1, "detail"]
    assert rejects.loc[3, "reason"] == "duplicate_image_id"
    (row,) = manifest.rows.itertuples()
    assert row.image_id == "b.png" and pd.isna(row.age) and pd.isna(row.sex) and sum(row.labels) == 0


@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0011-0001-0002.jpeg", "IM-0011"),
    ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
    ("scan.jpeg", None),
])
def test_pneumonia_patient_id_from_file_name(name, patient):
    assert pneumonia.patient_id_from_name(name) == patient


def test_real_pneumonia_train_folder_manifest(tmp_path):
    (tmp_path / "train").symlink_to(require(KERMANY))  # the download without its test folder
    manifest = pneumonia.build_manifest(tmp_path)
    assert len(manifest.rows) == 5216 and manifest.rejects.empty
    assert manifest.rows["labels"].map(lambda v: v[0]).sum() == 3875
    assert manifest.rows["official_split"].isna().all()  # no test folder: seeded split makes all three
    assert manifest.rows["patient_id"].nunique() < 5216  # patients have several images

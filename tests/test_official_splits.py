"""Official test splits kept as they come: the pneumonia download, whose folders number patients
each on their own, through the manifest and the real Spark ETL."""
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import KERMANY, current, require, spark_etl
from cxr_pipeline.etl.sources import pneumonia
from cxr_pipeline.etl.splits import SplitLeakError, assign_splits, check_patient_disjoint

KERMANY_ROOT = KERMANY.parent


def test_pneumonia_ids_are_namespaced_by_the_folder_that_numbers_them():
    require(KERMANY_ROOT / "test")
    manifest = pneumonia.build_manifest(KERMANY_ROOT)
    rows = manifest.rows
    test = rows[rows["official_split"] == "test"]
    assert len(rows) == 5216 + 311 and manifest.rejects.empty
    assert len(test) == 311 and test["image_id"].str.startswith("test/").all()
    assert test["patient_id"].str.startswith("test/").all()
    assert rows.loc[rows["official_split"] == "train_val", "patient_id"].str.startswith("train/").all()
    # the shared data's README: 75 ids of test/ also occur in train/, for other children
    assert pneumonia.colliding_ids(rows["patient_id"]) == 75
    splits = assign_splits(rows["patient_id"], 0, (0.9, 0.1, 0.0), rows["official_split"])
    check_patient_disjoint(rows["patient_id"], splits)  # would raise on 75 patients without the namespaces


def test_val_folder_shares_the_train_numbering(tmp_path):
    for folder, name in (("train/PNEUMONIA", "person7_bacteria_1.jpeg"), ("val/PNEUMONIA", "person7_bacteria_2.jpeg"),
                         ("test/PNEUMONIA", "person7_virus_3.jpeg")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_bytes(b"x")
    patients = pneumonia.build_manifest(tmp_path).rows.set_index("image_id")["patient_id"]
    assert patients["train/PNEUMONIA/person7_bacteria_1.jpeg"] == patients["val/PNEUMONIA/person7_bacteria_2.jpeg"]
    assert patients["test/PNEUMONIA/person7_virus_3.jpeg"] == "test/person7"


def test_a_real_leak_in_a_globally_numbered_source_still_fails_with_a_count():
    ids = pd.Series(["p1", "p1", "p2", "p3", "p3"])
    with pytest.raises(SplitLeakError, match="^2 patients have images in more than one split"):
        check_patient_disjoint(ids, pd.Series(["train", "test", "train", "val", "test"]))


def test_spark_etl_on_the_pneumonia_download_as_it_is(tmp_path):
    """The shared download (train/ + test/, ids colliding) through the real ETL: split=test holds
    exactly the images of test/, and no (namespaced) patient sits in two splits."""
    require(KERMANY_ROOT / "test")
    output = tmp_path / "pneumonia_32"
    result = spark_etl("--source", "pneumonia", "--data-root", KERMANY_ROOT, "--output", output, "--size", 32,
                       "--split-fractions", "0.9,0.1,0.0", "--rows-per-file", 512)
    assert "75 bare ids occur in more than one numbering" in result.stdout + result.stderr
    summary = json.loads((current(output) / "_etl_summary.json").read_text())
    assert summary["rows_read"] == 5527 and summary["rows_quarantined"] == 0
    assert summary["rows_written"]["test"] == 311
    written = pq.read_table(current(output), columns=["image_id", "patient_id", "split"]).to_pandas()
    expected = sorted(str(p.relative_to(KERMANY_ROOT)) for p in (KERMANY_ROOT / "test").rglob("*.jpeg"))
    assert sorted(written.loc[written["split"] == "test", "image_id"]) == expected
    assert written.groupby("patient_id")["split"].nunique().max() == 1

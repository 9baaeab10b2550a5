"""The ETL's bad-input battery: every case gets its reason, nothing is lost, counts reconcile."""
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import KERMANY, NIH, current, require, spark_etl
from cxr_pipeline.etl.images import MAX_PIXELS

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def quarantine(output):
    return pq.read_table(current(output) / "_quarantine" / "rejects.parquet").to_pandas().set_index("image_id")


def written(output):
    output = current(output)
    return pd.concat([pq.read_table(output / f"split={s}", columns=["image_id", "age", "sex"]).to_pandas()
                      for s in ("train", "val", "test") if (output / f"split={s}").exists()]).set_index("image_id")


@pytest.fixture(scope="module")
def nih_battery(tmp_path_factory):
    images = require(NIH / "images")
    root = tmp_path_factory.mktemp("battery") / "nih"
    (root / "images").mkdir(parents=True)
    good = ["00000075_000.png", "00000100_000.png"]  # grey, RGBA
    for name in good + ["00001369_000.png", "00004934_000.png"]:
        shutil.copy(images / name, root / "images" / name)
    grey = np.asarray(Image.open(images / "00000075_000.png").convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 16 + 7).save(root / "images" / "sixteen_bit.png")  # 12-bit values in 16 bits
    data = (images / "00001369_000.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "images" / "zero.png").write_bytes(b"")
    (root / "images" / "text.png").write_text("not an image")
    side = int(MAX_PIXELS**0.5) + 100
    Image.new("L", (side, side)).save(root / "images" / "bomb.png")
    shutil.copy(images / "00002578_000.png", root / "images" / "unlisted.png")
    rows = [
        ("00000075_000.png", "Cardiomegaly", 1, 61, "F"),
        ("00000100_000.png", "Effusion", 2, 60, "M"),
        ("sixteen_bit.png", "No Finding", 3, 40, "M"),
        ("00001369_000.png", "Mass|Nodule", 4, "abc", "?"),  # malformed age and sex: kept, warned
        ("truncated.png", "No Finding", 5, 30, "F"),
        ("zero.png", "No Finding", 6, 30, "F"),
        ("text.png", "No Finding", 7, 30, "F"),
        ("bomb.png", "No Finding", 8, 30, "F"),
        ("missing.png", "No Finding", 9, 30, "F"),
        ("00000075_000.png", "Hernia", 1, 61, "F"),  # duplicate image id
        ("00004934_000.png", "Effusion|Pneumonitis", 10, 30, "F"),  # unknown label
        ("../../etc/passwd", "No Finding", 11, 30, "F"),
        ("/etc/passwd", "No Finding", 12, 30, "F"),
    ]
    (root / "Data_Entry_2017.csv").write_text(
        HEADER + "".join(f"{n},{f},0,{p},{a},{s},PA\n" for n, f, p, a, s in rows))
    output = root.parent / "out"
    spark_etl("--source", "nih", "--data-root", root, "--output", output, "--size", 64, "--max-bad-fraction", 1)
    return output


def test_each_bad_row_has_its_reason_and_source_row(nih_battery):
    rejects = quarantine(nih_battery)
    expected = {
        "truncated.png": "undecodable", "zero.png": "empty_file", "text.png": "not_an_image",
        "bomb.png": "too_many_pixels", "missing.png": "image_missing", "../../etc/passwd": "path_escapes_root",
        "/etc/passwd": "path_escapes_root", "unlisted.png": "unlisted_image",
    }
    for image_id, reason in expected.items():
        assert rejects.loc[image_id, "reason"] == reason, image_id
    assert pd.isna(rejects.loc["unlisted.png", "source_row"])
    by_row = rejects.reset_index().set_index("source_row")
    assert by_row.loc[10, "reason"] == "duplicate_image_id"
    assert by_row.loc[11, "reason"] == "unknown_label" and "Pneumonitis" in by_row.loc[11, "detail"]


def test_counts_reconcile_and_converted_images_are_written(nih_battery):
    summary = json.loads((current(nih_battery) / "_etl_summary.json").read_text())
    assert summary["rows_read"] == 14  # 13 label rows + 1 unlisted file
    assert sum(summary["rows_written"].values()) == 4 and summary["rows_quarantined"] == 10
    assert sum(summary["quarantined_by_reason"].values()) == 10
    rows = written(nih_battery)
    assert set(rows.index) == {"00000075_000.png", "00000100_000.png", "sixteen_bit.png", "00001369_000.png"}
    assert pd.isna(rows.loc["00001369_000.png", "age"]) and rows.loc["00001369_000.png", "sex"] is None
    assert summary["values_kept_as_null"] == {"age": 1, "sex": 1}


def test_pneumonia_folder_with_truncated_and_fake_jpegs(tmp_path):
    source = require(KERMANY)
    root = tmp_path / "chest_xray"
    for folder in ("NORMAL", "PNEUMONIA"):
        (root / "train" / folder).mkdir(parents=True)
        for name in sorted((source / folder).iterdir())[:4]:
            shutil.copy(name, root / "train" / folder / name.name)
    data = next((source / "NORMAL").iterdir()).read_bytes()
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(data[: len(data) // 3])
    (root / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg").write_bytes(b"GIF89a not really")
    (root / "train" / "PNEUMONIA" / "scan_without_patient.jpeg").write_bytes(data)
    output = tmp_path / "out"
    spark_etl("--source", "pneumonia", "--data-root", root, "--output", output, "--size", 64,
              "--max-bad-fraction", 1, "--rows-per-file", 2)
    summary = json.loads((current(output) / "_etl_summary.json").read_text())
    rejects = quarantine(output)
    assert summary["rows_read"] == 11 and sum(summary["rows_written"].values()) == 8
    assert rejects.loc["train/NORMAL/IM-9999-0001.jpeg", "reason"] == "undecodable"
    assert rejects.loc["train/PNEUMONIA/person9999_virus_1.jpeg", "reason"] == "not_an_image"
    assert rejects.loc["train/PNEUMONIA/scan_without_patient.jpeg", "reason"] == "unknown_patient"


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "nih").mkdir()
    (tmp_path / "nih" / "Data_Entry_2017.csv").write_text(HEADER)
    with pytest.raises(pytest.fail.Exception, match="nothing to do: no label rows and no images"):
        spark_etl("--source", "nih", "--data-root", tmp_path / "nih", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""The Spark job (spark-submit, local[2]) over real NIH PNGs, including dirty input."""
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import NIH, current, require, spark_etl
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.images import decode_resize
from cxr_pipeline.etl.sources.nih import LABEL_NAMES
from cxr_pipeline.schema import read_dataset_spec


def read_split(dataset, split):
    return pq.read_table(dataset / f"split={split}").to_pandas()


def test_real_nih_rows_shapes_labels_and_summary(nih_dataset):
    summary = json.loads((nih_dataset / "_etl_summary.json").read_text())
    assert summary["rows_read"] == 100 and summary["rows_quarantined"] == 0
    assert sum(summary["rows_written"].values()) == 100
    rows = pd.concat([read_split(nih_dataset, s).assign(split=s) for s in ("train", "val", "test")])
    assert len(rows) == 100 and rows["image_id"].is_unique
    assert rows.groupby("patient_id")["split"].nunique().max() == 1
    assert (rows["pixels_u8"].map(len) == 64 * 64).all()
    csv = pd.read_csv(NIH / "Data_Entry_sample.csv").set_index("Image Index")
    for row in rows.itertuples():
        findings = set(csv.loc[row.image_id, "Finding Labels"].split("|")) - {"No Finding"}
        assert {n for n, v in zip(LABEL_NAMES, row.labels) if v == 1.0} == findings


def test_stored_pixels_equal_direct_decode_including_rgba(nih_dataset):
    rows = pd.concat([read_split(nih_dataset, s) for s in ("train", "val", "test")]).set_index("image_id")
    for name in ("00000100_000.png", "00005813_000.png", "00000075_000.png"):  # two RGBA, one grey
        expected = decode_resize((NIH / "images" / name).read_bytes(), 64)
        assert np.frombuffer(rows.loc[name, "pixels_u8"], np.uint8).reshape(64, 64).tolist() == expected.tolist()


def test_spec_is_read_back_from_the_parquet_footer(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    assert spec.dataset == "nih" and spec.label_names == LABEL_NAMES
    assert spec.image_size == 64 and spec.pixel_column == "pixels_u8" and spec.pixel_shape == (1, 64, 64)


def test_bad_rows_are_quarantined_with_reasons_and_counts_reconcile(tmp_path):
    images = require(NIH / "images")
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    names = sorted(p.name for p in images.glob("*.png"))[:6]
    for name in names[:4]:
        shutil.copy(images / name, root / "images" / name)
    data = (images / names[4]).read_bytes()
    (root / "images" / names[4]).write_bytes(data[: len(data) // 3])  # truncated PNG
    (root / "images" / "zero.png").write_bytes(b"")
    csv = pd.read_csv(NIH / "Data_Entry_sample.csv").set_index("Image Index").loc[names].reset_index()
    zero = csv.iloc[[0]].assign(**{"Image Index": "zero.png", "Patient ID": 999999})
    pd.concat([csv, zero]).to_csv(root / "Data_Entry_2017.csv", index=False)  # names[5] has no file
    output = tmp_path / "out"
    spark_etl("--source", "nih", "--data-root", root, "--output", output, "--size", 64, "--max-bad-fraction", 1)
    summary = json.loads((current(output) / "_etl_summary.json").read_text())
    rejects = pq.read_table(current(output) / "_quarantine" / "rejects.parquet").to_pandas().set_index("image_id")
    assert summary["rows_read"] == 7
    assert sum(summary["rows_written"].values()) == 4 and summary["rows_quarantined"] == 3
    assert rejects.loc[names[4], "reason"] == "undecodable"
    assert rejects.loc[names[5], "reason"] == "image_missing"
    assert rejects.loc["zero.png", "reason"] == "empty_file"
    assert rejects.loc[names[5], "source_row"] == 6


def test_too_many_bad_rows_fail_the_job_and_keep_a_version_training_never_reads(tmp_path):
    images = require(NIH / "images")
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    shutil.copy(images / "00000075_000.png", root / "images")
    pd.read_csv(NIH / "Data_Entry_sample.csv").to_csv(root / "Data_Entry_2017.csv", index=False)
    output = tmp_path / "out"
    with pytest.raises(pytest.fail.Exception, match="(?s)99.0% of rows were quarantined.*not made current"):
        spark_etl("--source", "nih", "--data-root", root, "--output", output, "--size", 64)
    (kept,) = versions.list_versions(output)  # written for inspection, never what training reads
    assert not kept.current and versions.resolve(output).version is None
    assert json.loads((kept.path / "_etl_summary.json").read_text())["rows_quarantined"] == 99
    assert versions.prune(output) == [] and versions.prune(output, keep_days=0, dry_run=True) == [kept.id]

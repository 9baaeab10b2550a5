"""DICOM decoding and the dicom source, on the real chest CR (15-bit MONOCHROME1, windowed),
uncompressed and JPEG 2000 lossless; one small Spark ETL checks that no identifying header
value reaches the Parquet."""
import hashlib
import hmac
import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from conftest import DICOM, current, require, spark_etl
from cxr_pipeline.etl.dicom_images import dicom_to_grey_u8
from cxr_pipeline.etl.images import ImageError, decode_resize
from cxr_pipeline.etl.sources import dicom

FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
IDENTIFYING_VRS = ("PN", "DA", "DT", "TM", "UI", "LO", "SH")


def real_bytes(name: str) -> bytes:
    return (require(DICOM) / name).read_bytes()


def changed(name: str, edit) -> bytes:
    """The real file with `edit(dataset)` applied, as Part 10 bytes."""
    ds = pydicom.dcmread(io.BytesIO(real_bytes(name)))
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def identifying_values(name: str) -> set[str]:
    """Every name, date, time, UID and ID-like string of the file's header (4+ characters)."""
    ds = pydicom.dcmread(DICOM / name, stop_before_pixels=True)
    values = {str(element.value) for element in ds.iterall() if element.VR in IDENTIFYING_VRS}
    return {value for value in values if len(value) >= 4} | {str(ds.PatientID)}


def test_uncompressed_and_jpeg2000_give_the_same_pixels():
    full = [dicom_to_grey_u8(real_bytes(name)) for name in FILES]
    assert full[0].shape == (1955, 1841) and full[0].dtype == np.uint8
    assert np.array_equal(full[0], full[1])
    resized = [decode_resize(real_bytes(name), 224) for name in FILES]  # through the ETL's dispatch
    assert resized[0].shape == (224, 224) and np.array_equal(resized[0], resized[1])


def test_window_and_monochrome1_follow_pydicom_and_show_dark_lungs():
    ds = pydicom.dcmread(DICOM / "RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / (2**15 - 1)  # pydicom's own window
    expected = np.round(255 * (1 - windowed))
    grey = dicom_to_grey_u8(real_bytes("RG1_UNCR.dcm"))
    assert np.abs(grey.astype(int) - expected).max() <= 1
    rows, columns = grey.shape
    mediastinum = grey[rows // 3: rows // 2, columns // 2 - 60: columns // 2 + 60].mean()
    lungs = np.mean([grey[rows // 3: rows // 2, c - 60: c + 60].mean() for c in (columns // 4, 3 * columns // 4)])
    assert mediastinum > lungs + 20  # displayed as a radiograph: bone and heart bright, air dark


def test_monochrome2_is_the_inverse_and_no_window_stretches_the_range():
    inverted = dicom_to_grey_u8(changed("RG1_UNCR.dcm", lambda ds: setattr(ds, "PhotometricInterpretation",
                                                                             "MONOCHROME2")))
    grey = dicom_to_grey_u8(real_bytes("RG1_UNCR.dcm"))
    assert np.abs(inverted.astype(int) - (255 - grey.astype(int))).max() <= 1

    def drop_window(ds):
        del ds.WindowCenter, ds.WindowWidth

    stretched = dicom_to_grey_u8(changed("RG1_UNCR.dcm", drop_window))
    assert stretched.min() == 0 and stretched.max() == 255 and grey.min() > 0  # the window did not reach the ends


@pytest.mark.parametrize("edit, reason, message", [
    (lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2.4.80"), "unsupported_compression",
     "install its plugin"),
    (lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"), "unsupported_compression",
     "no DICOM pixel decoder exists"),
    (lambda ds: (setattr(ds, "Rows", 9000), setattr(ds, "Columns", 9000)), "too_many_pixels", "9000x9000"),
    (lambda ds: delattr(ds, "PixelData"), "not_an_image", "no Pixel Data"),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), "unsupported_photometric", "PALETTE"),
])
def test_files_that_cannot_be_shown_fail_with_a_reason(edit, reason, message):
    with pytest.raises(ImageError, match=message) as failure:
        dicom_to_grey_u8(changed("RG1_J2KR.dcm", edit))
    assert failure.value.reason == reason


@pytest.mark.parametrize("name", FILES)
def test_truncated_files_are_undecodable(name):
    data = real_bytes(name)
    with pytest.raises(ImageError, match="truncated") as failure:
        decode_resize(data[: len(data) // 2], 64)
    assert failure.value.reason == "undecodable"


def write_labels(path, key: str, keys: list[str], values: list[str]) -> None:
    pd.DataFrame({key: keys, "Effusion": values, "Mass": ["0"] * len(keys)}).to_csv(path, index=False)


def test_manifest_by_uid_hashes_the_patient_and_names_rows_without_their_uid(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_PATIENT_ID_KEY", "site-secret")
    uids = [str(pydicom.dcmread(DICOM / name, stop_before_pixels=True).SOPInstanceUID) for name in FILES]
    unknown_uid = uids[0] + ".99"
    write_labels(tmp_path / "labels.csv", "SOPInstanceUID", [*uids, unknown_uid], ["1", "", "0"])
    manifest = dicom.build_manifest(require(DICOM), tmp_path / "labels.csv")
    assert manifest.label_names == ("Effusion", "Mass")
    rows = manifest.rows.set_index("image_id")
    assert rows.loc["RG1_UNCR.dcm", "labels"] == [1.0, 0.0] and rows.loc["RG1_J2KR.dcm", "labels"] == [0.0, 0.0]
    expected_patient = hmac.new(b"site-secret", b"9RG1", hashlib.sha256).hexdigest()[:32]
    assert set(rows["patient_id"]) == {expected_patient}
    assert rows["age"].tolist() == [64, 64] and set(rows["sex"]) == {"F"} and set(rows["view_position"]) == {"PA"}
    (reject,) = manifest.rejects.itertuples()
    assert (reject.reason, reject.image_id, reject.source_row) == ("image_missing", "labels.csv row 3", 3)
    kept = " ".join(map(str, manifest.rows.drop(columns="labels").to_numpy().ravel())) + str(manifest.rejects)
    assert not [value for value in identifying_values("RG1_UNCR.dcm") | {unknown_uid} if value in kept]
    monkeypatch.setenv("CXR_PATIENT_ID_KEY", "another-secret")
    assert dicom.build_manifest(DICOM, tmp_path / "labels.csv").rows["patient_id"].iloc[0] != expected_patient


def test_manifest_by_file_name_rejects_bad_values_and_reports_unlisted_files(tmp_path):
    write_labels(tmp_path / "labels.csv", "file", ["RG1_UNCR.dcm", "missing.dcm"], ["maybe", "1"])
    manifest = dicom.build_manifest(require(DICOM), tmp_path / "labels.csv")
    assert manifest.rows.empty
    reasons = manifest.rejects.set_index("image_id")["reason"].to_dict()
    assert reasons == {"RG1_UNCR.dcm": "unknown_label", "labels.csv row 2": "image_missing",
                       "RG1_J2KR.dcm": "unlisted_image"}
    assert "Effusion=maybe" in manifest.rejects.set_index("image_id").loc["RG1_UNCR.dcm", "detail"]


def test_etl_writes_equal_pixels_for_both_files_and_no_identifying_value(tmp_path):
    uids = [str(pydicom.dcmread(DICOM / name, stop_before_pixels=True).SOPInstanceUID) for name in FILES]
    write_labels(tmp_path / "labels.csv", "SOPInstanceUID", uids, ["1", "0"])
    output = tmp_path / "dicom_64"
    spark_etl("--source", "dicom", "--data-root", require(DICOM), "--labels-csv", tmp_path / "labels.csv",
              "--output", output, "--size", 64, env={"CXR_PATIENT_ID_KEY": "site-secret"})
    table = pq.read_table(current(output), columns=None).to_pandas()
    assert sorted(table["image_id"]) == sorted(FILES)
    pixels = {row.image_id: np.frombuffer(row.pixels_u8, np.uint8) for row in table.itertuples()}
    assert np.array_equal(pixels["RG1_UNCR.dcm"], pixels["RG1_J2KR.dcm"])
    assert np.array_equal(pixels["RG1_UNCR.dcm"], decode_resize(real_bytes("RG1_UNCR.dcm"), 64).ravel())
    text_cells = " ".join(str(v) for column in table.columns if column != "pixels_u8" for v in table[column])
    footer = str(pq.read_schema(next(current(output).glob("split=*/*.parquet"))).metadata)
    leaked = [value for value in identifying_values("RG1_UNCR.dcm") | identifying_values("RG1_J2KR.dcm")
              if value in text_cells or value in footer]
    assert leaked == []

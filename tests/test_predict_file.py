"""training.predict to a file: folders, globs, lists and ETL datasets in, one row per image out,
unreadable images listed with their reason; the same probabilities from files and from Parquet."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BIN, NIH, require, run_cli
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.evaluation import calibration
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.predict import main as predict


def save_checkpoint(path, spec, calibrated=True):
    """A small_cnn checkpoint as train.py writes one, with calibration and thresholds."""
    torch.manual_seed(0)
    model = build_model("small_cnn", spec.num_labels, "none")
    states = [{"method": "platt", "a": 0.5, "b": 0.2}] * spec.num_labels if calibrated else None
    checkpoints.save({"model": model.state_dict(), "stage": "finetune", "epoch": 1, "val_mean_auroc": 0.5,
                      "model_name": "small_cnn", "dataset_spec": spec.to_json(), "calibration": states,
                      "thresholds": [0.5] * spec.num_labels, "operating_point": "youden"}, path)
    return path


def test_folder_glob_and_list_give_one_row_per_image_with_reasons(nih_dataset, tmp_path):
    spec = read_dataset_spec(nih_dataset)
    checkpoint = save_checkpoint(tmp_path / "best.pth", spec)
    images = sorted(require(NIH / "images").glob("*.png"))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in images[:4]:
        (folder / image.name).symlink_to(image)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "empty.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images[4]}\n{tmp_path / 'gone.png'}\n")
    pattern = NIH / "images" / f"{images[6].name[:7]}[{images[6].name[7]}]{images[6].name[8:]}"  # one file
    rows = predict(["--checkpoint", str(checkpoint), str(folder), str(pattern),
                    str(listing), "--output", str(tmp_path / "p.csv"), "--parquet", "--batch-size", "3"])
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(written) == 6 + 1 + 2 == len(rows)
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == len(written)
    errors = written.set_index("image_id")["error"]
    assert errors["broken.png"].startswith("not_an_image") and errors["empty.png"].startswith("empty_file")
    assert errors[str(tmp_path / "gone.png")].startswith("image_missing")
    good = written[written["error"] == ""]
    assert len(good) == 6 and good["Effusion"].astype(float).between(0, 1).all()
    assert (good["Effusion_positive"].astype(int) == (good["Effusion"].astype(float) >= 0.5)).all()
    assert (written.loc[written["error"] != "", "Effusion"] == "").all()  # no score for an unreadable image


def test_calibration_from_the_checkpoint_is_applied(nih_dataset, tmp_path):
    spec = read_dataset_spec(nih_dataset)
    image = str(sorted(require(NIH / "images").glob("*.png"))[0])
    raw = predict(["--checkpoint", str(save_checkpoint(tmp_path / "raw.pth", spec, calibrated=False)), image])
    calibrated = predict(["--checkpoint", str(save_checkpoint(tmp_path / "cal.pth", spec)), image])
    labels = list(spec.label_names)
    expected = calibration.apply([{"method": "platt", "a": 0.5, "b": 0.2}] * len(labels),
                                 raw[labels].to_numpy(dtype=float))
    assert np.allclose(calibrated[labels].to_numpy(dtype=float), expected, atol=1e-9)
    assert not np.allclose(expected, raw[labels].to_numpy(dtype=float))


def test_files_and_the_etl_dataset_give_the_same_probabilities(nih_dataset, tmp_path):
    """One preprocessing path: the PNG files decoded by predict, and the rows the Spark ETL
    decoded from the same files, give the same model output."""
    spec = read_dataset_spec(nih_dataset)
    checkpoint = str(save_checkpoint(tmp_path / "best.pth", spec))
    from_parquet = predict(["--checkpoint", checkpoint, str(nih_dataset), "--split", "test"])
    names = from_parquet["image_id"].tolist()
    from_files = predict(["--checkpoint", checkpoint, *[str(NIH / "images" / name) for name in names]])
    labels = list(spec.label_names)
    assert len(names) > 5
    assert np.abs(from_parquet[labels].to_numpy(float) - from_files[labels].to_numpy(float)).max() < 1e-6


def test_overlays_for_the_three_most_probable_labels(nih_dataset, tmp_path):
    spec = read_dataset_spec(nih_dataset)
    image = sorted(require(NIH / "images").glob("*.png"))[0]
    rows = predict(["--checkpoint", str(save_checkpoint(tmp_path / "best.pth", spec)), str(image),
                    "--overlay-dir", str(tmp_path / "overlays")])
    top3 = rows[list(spec.label_names)].iloc[0].astype(float).sort_values(ascending=False, kind="stable").index[:3]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == sorted(f"{image.stem}_{label}.png"
                                                                              for label in top3)


def test_predict_cli_help_and_a_size_mismatch(nih_dataset, tmp_path):
    assert "one row per input image" in run_cli(BIN / "python", "-m", "training.predict", "--help").stdout
    spec = dataclasses.replace(read_dataset_spec(nih_dataset), image_size=32)
    checkpoint = save_checkpoint(tmp_path / "best.pth", spec)
    with pytest.raises(SystemExit, match="rerun the ETL at that size"):
        predict(["--checkpoint", str(checkpoint), str(nih_dataset)])


def test_results_table_holds_one_row_per_image_and_checkpoint(nih_dataset, tmp_path):
    """predict --results-table: the rows read back from the Delta table, in the table's columns; scoring some of
    the images again replaces their rows rather than adding to them."""
    from deltalake import DeltaTable

    from cxr_pipeline.training.serving.predictions import columns

    spec = read_dataset_spec(nih_dataset)
    checkpoint = save_checkpoint(tmp_path / "best.pth", spec)
    images = [str(path) for path in sorted(require(NIH / "images").glob("*.png"))[:3]]
    table = str(tmp_path / "scores")
    predict(["--checkpoint", str(checkpoint), *images[:2], "--results-table", table])
    again = predict(["--checkpoint", str(checkpoint), *images, "--results-table", table]).set_index("image_id")
    stored = DeltaTable(table).to_pandas()
    assert list(stored.columns) == columns(spec.label_names, table=True) and len(DeltaTable(table).history()) == 2
    assert sorted(stored["image_id"]) == images and set(stored["model_uri"]) == {str(checkpoint.resolve())}
    assert set(stored["checkpoint_sha256"]) == {checkpoints.recorded_sha256(checkpoint)}
    stored = stored.set_index("image_id").loc[images]
    labels = list(spec.label_names)
    assert np.allclose(stored[labels].to_numpy(float), again.loc[images, labels].to_numpy(float), atol=1e-12)
    assert (stored["scored_at"] == again["scored_at"].iloc[0]).all()  # the second run's rows, not the first's

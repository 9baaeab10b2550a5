"""The one preprocessing path (training/data/inputs.py): uint8 as stored -> model input on the device,
the ETL's mean image, CheXNet-style evaluation crops, and train / evaluate / predict agreeing."""
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import BIN, NIH, run_cli
from cxr_pipeline.etl.images import choose_decoder
from cxr_pipeline.etl.mean_image import read_mean_image
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.data.reader import SplitReader
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.predict import main as predict
from cxr_pipeline.training.serving.scorer import read_batches


def stored_train_pixels(dataset, spec) -> np.ndarray:
    column = pq.read_table(dataset / "split=train", columns=[spec.pixel_column]).column(spec.pixel_column)
    return np.stack([np.frombuffer(v.as_py(), np.uint8).reshape(spec.image_size, spec.image_size) for v in column])


def test_device_side_transform_gives_the_cpu_float_path_logits(nih_dataset):
    """The loader used to normalise on the host: (x / 255 - mean) / std over 3 channels. The uint8
    batch through InputTransform must give the model the same logits."""
    spec = read_dataset_spec(nih_dataset)
    batch = next(iter(SplitReader(nih_dataset, "val", spec, batch_size=8)))
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    old_path = (batch.images.float() / 255.0 - mean) / std
    torch.manual_seed(0)
    model = build_model("resnet18", spec.num_labels, "none").eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(InputTransform(spec)(batch.images)).numpy(), model(old_path).numpy(),
                                   atol=1e-5)


def test_etl_mean_image_is_the_average_of_the_train_split_only(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    train = stored_train_pixels(nih_dataset, spec).astype(np.float64) / 255.0
    mean = read_mean_image(nih_dataset)
    assert mean.rows == len(train) and mean.image.shape == (spec.image_size, spec.image_size)
    np.testing.assert_allclose(mean.image, train.mean(axis=0), atol=1e-6)
    assert mean.std == pytest.approx(float(np.sqrt(np.mean((train - train.mean(axis=0)) ** 2))), rel=1e-6)


def test_mean_image_normalisation_subtracts_the_average_on_three_channels(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    transform = InputTransform.for_dataset(nih_dataset, spec, "mean-image")
    pixels = torch.from_numpy(stored_train_pixels(nih_dataset, spec)[:, None])
    images = transform(pixels)
    assert images.shape == (len(pixels), 3, spec.image_size, spec.image_size)
    mean = read_mean_image(nih_dataset)
    expected = (pixels[:, 0].double() / 255.0 - torch.from_numpy(mean.image).double()) / mean.std
    for channel in range(3):
        np.testing.assert_allclose(images[:, channel].numpy(), expected.numpy(), atol=1e-5)
    # over the train split the result is centred per pixel, with unit spread overall
    assert images[:, 0].mean(dim=0).abs().max() < 1e-4 and images[:, 0].std().item() == pytest.approx(1, abs=0.01)


def test_evaluation_resizes_then_takes_the_centre_crop(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    transform = InputTransform(spec, eval_resize=80, eval_crop=64)
    stored = next(iter(SplitReader(nih_dataset, "val", spec, batch_size=4))).images
    plain = InputTransform(spec)(stored)
    resized = F.interpolate(plain, size=(80, 80), mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(transform(stored, evaluation=True).numpy(), resized[..., 8:72, 8:72].numpy(),
                               atol=1e-5)
    assert torch.equal(transform(stored), plain)  # training batches are not cropped
    with pytest.raises(ValueError, match="larger than the image"):
        InputTransform(spec, eval_crop=65)


def test_training_evaluation_and_predict_score_through_the_same_transform(nih_dataset, tmp_path):
    """A run with the mean image and an evaluation crop: its own val predictions, and predict on the
    same stored pixels from its checkpoint alone, agree."""
    run_cli(BIN / "python", "training/train.py", "--dataset", nih_dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none", "--stages",
            "finetune", "--epochs-finetune", "1", "--max-steps-per-epoch", "2", "--batch-size", "8",
            "--normalisation", "mean-image", "--eval-resize", "72", "--eval-crop", "64", "--calibration", "none",
            "--bootstrap", "20", "--run-id", "mean-crop", "--backend", "single")
    run = tmp_path / "runs" / "mean-crop"
    rows = predict(["--checkpoint", str(run / "best_finetune.pth"), str(nih_dataset), "--split", "val"])
    trained = pd.read_csv(run / "predictions_finetune_val.csv").set_index("image_id")
    labels = list(read_dataset_spec(nih_dataset).label_names)
    scored = rows.set_index("image_id").loc[trained.index, labels].astype(float)
    np.testing.assert_allclose(scored.to_numpy(), trained[labels].to_numpy(), atol=1e-5)


def test_predict_decodes_new_images_with_the_decoder_that_made_the_dataset(nih_dataset, monkeypatch):
    spec = read_dataset_spec(nih_dataset)
    assert spec.decoder == choose_decoder()  # recorded by the ETL
    table = pq.read_table(nih_dataset / "split=val", columns=["image_id", spec.pixel_column]).to_pandas()
    other = "pillow" if spec.decoder == "opencv" else "opencv"
    monkeypatch.setenv("CXR_DECODER", other)  # what this machine would pick now must not matter
    paths = [(image_id, NIH / "images" / image_id) for image_id in table["image_id"][:4]]
    _, _, stored, errors = next(read_batches(paths, spec, batch_size=4))
    assert not errors
    expected = np.stack([np.frombuffer(v, np.uint8) for v in table[spec.pixel_column][:4]])
    np.testing.assert_array_equal(stored.numpy().reshape(4, -1), expected)

"""A model, or a metric, added in one place reaches everything that uses it.

Each test runs a fresh Python that adds one entry (to training/models/registry.py's MODELS, or to
training/evaluation/metric_columns.py's METRICS) before anything else of the project is imported, exactly as
editing that one file would, then runs the real commands in that process: training with MLflow on, predict with
Grad-CAM overlays, the logged MLflow model, the Delta rows and the report."""
import json
import sys

from conftest import NIH, run_cli

TOY_MODEL = """
from torch import nn

from cxr_pipeline.training.models import registry


class Toy(nn.Module):
    def __init__(self, num_labels):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(4, num_labels)

    def forward(self, images):
        return self.classifier(self.features(images).mean(dim=(2, 3)))


registry.MODELS["toy"] = registry.Architecture(lambda num_labels, imagenet: Toy(num_labels), "classifier",
                                               ("classifier",), cam_layer="features.1")
"""

TRAIN_PREDICT_SERVE = """
import json, sys
from pathlib import Path

import mlflow
import pandas as pd

from cxr_pipeline.training import predict, train

dataset, out, image = sys.argv[1:4]
train.main(["--dataset", dataset, "--output-dir", f"{out}/runs", "--results-table", f"{out}/results",
            "--model", "toy", "--weights", "none", "--backend", "single", "--stages", "finetune",
            "--epochs-finetune", "1", "--batch-size", "4", "--max-steps-per-epoch", "2", "--bootstrap", "20"])
(run_dir,) = Path(out, "runs").iterdir()
rows = predict.main(["--checkpoint", str(run_dir / "best_finetune.pth"), image, "--overlay-dir", f"{out}/overlays"])
client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
(run,) = client.search_runs(client.search_experiments()[0].experiment_id)
mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
model = mlflow.pyfunc.load_model(run.data.tags["cxr_model_uri"])
served = model.predict(pd.DataFrame({"content": [Path(image).read_bytes()]}))  # the model reads no paths
print(json.dumps({"overlays": sorted(p.name for p in Path(out, "overlays").iterdir()),
                  "gradcam": sorted(p.name for p in (run_dir / "gradcam").iterdir()),
                  "predicted": rows.drop(columns=["path"]).iloc[0].to_dict(),
                  "served": served.iloc[0].to_dict()}, default=str))
"""


def run_python(setup: str, script: str, *args) -> dict:
    result = run_cli(sys.executable, "-c", setup + script, *args, timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_model_added_to_the_registry_trains_predicts_with_overlays_and_serves(nih_dataset, tmp_path):
    image = sorted((NIH / "images").glob("*.png"))[0]
    out = run_python(TOY_MODEL, TRAIN_PREDICT_SERVE, nih_dataset, tmp_path, image)
    assert out["overlays"] and all(name.startswith(image.stem) for name in out["overlays"])
    assert out["gradcam"]  # the run's Grad-CAM examples, logged to MLflow
    labels = [key for key, value in out["predicted"].items() if isinstance(value, float) and 0 <= value <= 1]
    assert labels
    for label in labels:  # the MLflow model gives predict's probabilities
        assert abs(out["served"][label] - out["predicted"][label]) < 1e-5


TOY_METRIC = """
from cxr_pipeline.training.evaluation import metric_columns

metric_columns.METRICS += (metric_columns.Metric("mean_probability", compute=lambda truth, p: p.mean()),)
"""

TRAIN_AND_REPORT = """
import json, sys
from pathlib import Path

import mlflow

from cxr_pipeline.training import train
from cxr_pipeline.training.evaluation.results import read_results

dataset, out = sys.argv[1:3]
train.main(["--dataset", dataset, "--output-dir", f"{out}/runs", "--results-table", f"{out}/results",
            "--model", "small_cnn", "--weights", "none", "--backend", "single", "--stages", "finetune",
            "--epochs-finetune", "1", "--batch-size", "4", "--max-steps-per-epoch", "2", "--bootstrap", "20"])
(run_dir,) = Path(out, "runs").iterdir()
rows = read_results(f"{out}/results")
client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
(run,) = client.search_runs(client.search_experiments()[0].experiment_id)
print(json.dumps({"columns": list(rows.columns),
                  "defined": int(rows["mean_probability"].notna().sum()),
                  "labels": int((rows["label"] != "mean").sum()),
                  "report": "mean_probability" in (run_dir / "report.html").read_text(),
                  "mlflow": sorted(k for k in run.data.metrics if "/mean_probability/" in k)}))
"""


def test_a_metric_added_to_the_list_reaches_the_delta_rows_the_report_and_mlflow(nih_dataset, tmp_path):
    out = run_python(TOY_METRIC, TRAIN_AND_REPORT, nih_dataset, tmp_path)
    assert "mean_probability" in out["columns"]
    assert out["defined"] == out["labels"] > 0  # every label of val and test has it; the mean row has none
    assert out["report"]
    assert any(name.startswith("finetune/test/mean_probability/") for name in out["mlflow"])


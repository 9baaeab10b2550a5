"""The folder says the stage: etl/ never imports torch, training/ never imports Spark, and what both share
(cxr_pipeline's config and schema) imports neither."""
import subprocess
import sys

import pytest

from conftest import ROOT

ETL = [f"cxr_pipeline.etl.{name}" for name in ("preprocess", "demo_data", "splits", "images", "sources")]
# Every module of training/ and its rooms but the MLflow model, which imports mlflow, and mlflow imports pyspark
# itself where it is installed (the model runs on Spark's executors in jobs/score.py).
TRAINING = sorted({"cxr_pipeline." + ".".join(path.with_suffix("").parts).removesuffix(".__init__")
                   for path in (ROOT / "training").rglob("*.py") for path in [path.relative_to(ROOT)]}
                  - {"cxr_pipeline.training.serving.mlflow_model"})
SHARED = ["cxr_pipeline.config", "cxr_pipeline.schema"]


@pytest.mark.parametrize("modules, forbidden", [(ETL, "torch"), (TRAINING, "pyspark"), (SHARED, "torch"),
                                                (SHARED, "pyspark")])
def test_stage_does_not_import_the_other_stage_framework(modules, forbidden):
    code = f"import sys, {', '.join(modules)}; print({forbidden!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

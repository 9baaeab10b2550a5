"""The folder says the stage: etl/ never imports torch, training/ never imports Spark, and what both share
(cxr_pipeline's config and schema) imports neither."""
import subprocess
import sys

import pytest

ETL = [f"cxr_pipeline.etl.{name}" for name in ("preprocess", "demo_data", "splits", "images", "sources")]
TRAINING = [f"cxr_pipeline.training.{name}" for name in ("train", "data", "models", "distributed", "results",
                                                         "metrics", "show_results")]
SHARED = ["cxr_pipeline.config", "cxr_pipeline.schema"]


@pytest.mark.parametrize("modules, forbidden", [(ETL, "torch"), (TRAINING, "pyspark"), (SHARED, "torch"),
                                                (SHARED, "pyspark")])
def test_stage_does_not_import_the_other_stage_framework(modules, forbidden):
    code = f"import sys, {', '.join(modules)}; print({forbidden!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

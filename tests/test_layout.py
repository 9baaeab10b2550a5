"""The folder says the stage: etl/ never imports torch, training/ never imports Spark."""
import subprocess
import sys

import pytest

ETL = ["etl.preprocess", "etl.demo_data", "etl.schema", "etl.splits", "etl.images", "etl.sources"]
TRAINING = ["training.train", "training.data", "training.models", "training.distributed", "training.results",
            "training.metrics", "training.show_results"]


@pytest.mark.parametrize("modules, forbidden", [(ETL, "torch"), (TRAINING, "pyspark")])
def test_stage_does_not_import_the_other_stage_framework(modules, forbidden):
    code = f"import sys, {', '.join(modules)}; print({forbidden!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

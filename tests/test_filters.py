"""training.filters draws the real 3x3 kernels of a trained checkpoint, and the report links them."""
import numpy as np
from PIL import Image

from conftest import BIN, run_cli
from cxr_pipeline.training.filters import CELL, GAP, ZOOM, main as filters
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.report import main as report


def test_kernel_grids_of_a_trained_vgg_like_skip_the_input_layer(nih_dataset, tmp_path):
    run_cli(BIN / "python", "training/train.py", "--dataset", nih_dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "vgg_like", "--weights", "none", "--stages",
            "finetune", "--epochs-finetune", 1, "--batch-size", 8, "--max-steps-per-epoch", 2, "--bootstrap", 20)
    (run_dir,) = (tmp_path / "runs").iterdir()
    page = filters(["--checkpoint", str(run_dir / "best_finetune.pth"), "--output", str(run_dir / "filters"),
                    "--max-channels", "16"])
    pictures = sorted((run_dir / "filters").glob("layer*.png"))
    assert len(pictures) == 7  # 8 convs, all 3x3; the first (1 grey input channel) is left out
    assert pictures[0].name == "layer01_features_3.png" and page.read_text().count("<img") == 7

    weight = checkpoints.load(run_dir / "best_finetune.pth")["model"]["features.3.weight"].numpy()  # 32 x 32 x 3 x 3
    picture = np.asarray(Image.open(pictures[0]))
    step = (CELL + GAP) * ZOOM
    assert picture.shape == (16 * step - GAP * ZOOM, 16 * step - GAP * ZOOM)  # cut to 16 x 16 kernels
    low, high = weight.min(), weight.max()
    for o, i in ((0, 0), (5, 9), (15, 15)):
        drawn = picture[o * step:o * step + CELL * ZOOM:ZOOM, i * step:i * step + CELL * ZOOM:ZOOM]
        assert np.abs(drawn.astype(int) - np.round((weight[o, i] - low) / (high - low) * 255)).max() <= 1

    html = report(["--table", str(tmp_path / "results")]).read_text()
    assert "href='filters/index.html'" in html

"""The HTML reports as people see them: a short real training run's RUN_DIR/report.html and `python -m
training.evaluate --output-dir`'s report.html (its main, in process), rendered by headless Chromium (Debian's
`chromium`; .ci/run installs it).

Every image loaded and every table present is a question about the rendered DOM, which the static pages
cannot answer about themselves: the test renders a copy of each page with one script added that, on the
load event, records per <img> whether it decoded (`complete && naturalWidth > 0`: a broken PNG is complete
with width 0) and per <table> its heading, rows and rendered height, and writes that as JSON into the page;
`chromium --dump-dom --virtual-time-budget` returns the DOM after load and its handlers. No DevTools
client or other dependency. The page itself (not the copy) is also screenshotted, and the picture must not
be blank. Skips with the reason when no Chromium binary is found."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, run_cli
from cxr_pipeline.training.evaluate import main as evaluate

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome-headless-shell")
WINDOW = (1280, 1600)
CHECK = """<script>window.addEventListener("load", () => {
  const heading = (e) => { while (e && !/^H[12]$/.test(e.tagName)) e = e.previousElementSibling;
                           return e ? e.textContent : null; };
  const images = [...document.images].map((i) => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                                  width: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map((t) => ({heading: heading(t), rows: t.rows.length,
                                                                     height: t.getBoundingClientRect().height,
                                                                     right: t.getBoundingClientRect().right}));
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "render-check";
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def browser() -> str:
    found = os.environ.get("CXR_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if not found:
        pytest.skip(f"no Chromium binary found (looked for {', '.join(BROWSERS)}; set CXR_CHROMIUM or "
                    "`apt-get install chromium`, as .ci/run does): the HTML reports are not rendered")
    return found


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run as root in a container: no sandbox, no GPU, a profile of its own."""
    result = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
                             "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"{browser} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def rendered(browser: str, page: Path, work: Path) -> dict:
    """{images: [{alt, loaded, width}], tables: [{heading, rows, height}]} of `page` after Chromium loaded it."""
    source = page.read_text()
    assert "</head>" in source, f"{page} has no <head> to add the check to"
    copy = work / f"checked_{page.parent.name}_{page.name}"
    copy.write_text(source.replace("</head>", CHECK + "</head>", 1))
    dom = headless(browser, work / "profile", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=10000",
                   "--dump-dom", copy.as_uri()).stdout
    found = re.search(r'<script type="application/json" id="render-check">(.*?)</script>', dom, re.S)
    assert found, f"the check did not run in {copy}; the DOM Chromium returned begins:\n{dom[:2000]}"
    return json.loads(found.group(1))


def screenshot(browser: str, page: Path, work: Path) -> np.ndarray:
    shot = work / f"{page.parent.name}_{page.stem}.png"
    headless(browser, work / "profile", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
             page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (WINDOW[1], WINDOW[0], 3)
    return pixels


def assert_seen(browser: str, page: Path, work: Path, images: set[str], headings: list[str]) -> dict:
    """Every image of `page` decoded and shown, these `images` among them (by alt: the file name); one table
    per <table> written, each with rows and a height, under these `headings` in order (prefixes), none reaching
    past the right edge of a 1280 px window; the screenshot not blank."""
    seen = rendered(browser, page, work)
    broken = [image["alt"] for image in seen["images"] if not (image["loaded"] and image["width"] > 0)]
    assert not broken, f"{page}: images not shown: {broken}"
    assert {image["alt"] for image in seen["images"]} >= images
    assert len(seen["images"]) == page.read_text().count("<img ")
    assert len(seen["tables"]) == page.read_text().count("<table"), f"{page}: tables lost in rendering"
    assert all(table["rows"] >= 2 and table["height"] > 20 for table in seen["tables"]), seen["tables"]
    wide = [(table["heading"], round(table["right"])) for table in seen["tables"] if table["right"] > WINDOW[0]]
    assert not wide, f"{page}: tables wider than a {WINDOW[0]} px window (heading, right edge): {wide}"
    titles = [table["heading"] or "" for table in seen["tables"]]
    assert len(titles) == len(headings) and all(t.startswith(h) for t, h in zip(titles, headings)), titles
    pixels = screenshot(browser, page, work)
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 20 and pixels.std() > 10, f"{page}: the screenshot is (nearly) one colour"
    return seen


@pytest.fixture(scope="module")
def run_dir(nih_dataset, tmp_path_factory) -> Path:
    """A short real run on the 100 real NIH images (1 epoch of 2 steps), as test_prediction_lineage makes."""
    root = tmp_path_factory.mktemp("browser_run")
    run_cli(BIN / "python", "training/train.py", "--dataset", nih_dataset, "--output-dir", root / "runs",
            "--results-table", root / "results", "--model", "small_cnn", "--weights", "none", "--stages", "finetune",
            "--epochs-finetune", 1, "--max-steps-per-epoch", 2, "--batch-size", 8, "--bootstrap", 20,
            "--backend", "single", "--no-mlflow")
    (run,) = (root / "runs").iterdir()
    return run


def test_the_checker_sees_a_broken_image(browser, tmp_path):
    """The check itself: a PNG that does not decode is reported, a good one is not."""
    Image.new("L", (8, 8), 128).save(tmp_path / "good.png")
    good = base64.b64encode((tmp_path / "good.png").read_bytes()).decode("ascii")
    (tmp_path / "page.html").write_text(
        f"<!doctype html><html><head><title>t</title></head><body><img alt='good' src='data:image/png;base64,{good}'>"
        "<img alt='broken' src='data:image/png;base64,AAAA'><img alt='missing' src='nowhere.png'></body></html>")
    seen = rendered(browser, tmp_path / "page.html", tmp_path)
    assert {image["alt"]: image["loaded"] for image in seen["images"]} == {"good": True, "broken": False,
                                                                           "missing": False}


def test_run_report_and_evaluate_report_render_with_every_image_and_table(browser, run_dir, nih_dataset, tmp_path):
    assert_seen(browser, run_dir / "report.html", tmp_path,
                images={"roc_finetune_val.png", "roc_finetune_test.png", "reliability_finetune_val.png",
                        "reliability_finetune_test.png", "training_curves.png"},
                headings=["finetune — val", "finetune — test", "finetune — operating points",
                          "finetune — calibration", "All runs in the table"])

    evaluate(["--dataset", str(nih_dataset), "--split", "test", "--bootstrap", "20", "--predictions",
              str(run_dir / "predictions_finetune_test.csv"), "--output-dir", str(tmp_path / "eval")])
    assert_seen(browser, tmp_path / "eval" / "report.html", tmp_path, images={"roc.png", "reliability.png"},
                headings=["predictions_finetune_test.csv on nih test", "Calibration"])

"""`pip install .` into a fresh venv: one top-level package, every cxr-* command, and the installed code runs
(not the checkout's). The venv borrows the project venv's libraries through a .pth file, so nothing is
downloaded; the project itself comes only from the wheel pip builds, from a copy of the source files git
knows (pip builds in the tree it is given, and the checkout's build/ must stay out of the other tests)."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from cxr_pipeline.cli import COMMANDS


def run(*args, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("install")
    venv = folder / "venv"
    run(sys._base_executable, "-m", "venv", venv, cwd=folder)
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=folder).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = folder / "source"
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():  # a file deleted but not yet committed is still listed
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", source,
        cwd=folder)
    return venv, site, folder


def test_the_wheel_installs_one_top_level_package(fresh_venv):
    venv, site, folder = fresh_venv
    installed = {path.name for path in site.iterdir() if path.name != "__pycache__"}
    ours = {name for name in installed if not name.endswith((".pth", "-info")) and name != "_distutils_hack"
            and not name.startswith(("pip", "setuptools", "pkg_resources"))}
    assert ours == {"cxr_pipeline"}
    assert {path.name for path in (site / "cxr_pipeline").iterdir()} >= {"etl", "training", "jobs", "config.py",
                                                                         "schema.py", "cli.py"}
    assert {path.name for path in (venv / "bin").glob("cxr-*")} == set(COMMANDS)  # setup.py's list is cli.py's
    probe = "import importlib.util as u; print([u.find_spec(n) is None for n in ('etl', 'training', 'jobs')])"
    assert run(venv / "bin" / "python", "-c", probe, cwd=folder).stdout.strip() == "[True, True, True]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_itself(fresh_venv, command):
    venv, _, folder = fresh_venv
    result = run(venv / "bin" / command, "--help", cwd=folder)
    assert result.stdout.startswith(f"usage: {command}") and len(result.stdout.splitlines()) > 5


def test_the_installed_code_runs_from_the_wheel(fresh_venv):
    """cxr-evaluate on a predictions file, from a folder outside the checkout: the wheel's modules run."""
    venv, site, folder = fresh_venv
    where = run(venv / "bin" / "python", "-c", "import cxr_pipeline.training.evaluate as m; print(m.__file__)",
                cwd=folder).stdout.strip()
    assert Path(where).is_relative_to(site)
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    pd.DataFrame({"image_id": [f"i{n}" for n in range(200)], "Pneumonia": truth}).to_csv(folder / "labels.csv",
                                                                                       index=False)
    pd.DataFrame({"image_id": [f"i{n}" for n in range(200)], "Pneumonia": truth * 0.5 + rng.random(200) * 0.6}
                 ).to_csv(folder / "predictions.csv", index=False)
    run(venv / "bin" / "cxr-evaluate", "--predictions", "predictions.csv", "--labels-csv", "labels.csv",
        "--bootstrap", "50", "--output-dir", "eval", cwd=folder)
    assert (folder / "eval" / "report.html").exists()

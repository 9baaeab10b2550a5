"""cxr-pipeline: Spark ETL + distributed PyTorch training for chest X-ray pathology.

Install with `make install` (see install/setup_env.sh): Petastorm and Horovod need steps
that pip's resolver cannot express (Petastorm without its setuptools<70 pin, Horovod built
from a patched sdist), so they are not listed here.
"""
import runpy
from pathlib import Path

from setuptools import setup

# One installed top-level name: the checkout's stage folders become subpackages of cxr_pipeline
# (cxr_pipeline/__init__.py says why). The editable install maps the same names onto the folders.
STAGES = ("etl", "training", "jobs")
PACKAGE_DIRS = {"cxr_pipeline": "cxr_pipeline"} | {
    ".".join(("cxr_pipeline", *folder.parts)): folder.as_posix()
    for stage in STAGES for folder in sorted(Path(stage).glob("**/")) if (folder / "__init__.py").exists()}
# The installed commands are cxr_pipeline/cli.py's COMMANDS; cli.py imports nothing of the project, so it runs
# here before anything is installed.
CLI = runpy.run_path("cxr_pipeline/cli.py")

setup(
    name="cxr-pipeline",
    version="0.1.0",
    description="Chest X-ray pathology pipeline: Spark ETL to Parquet, Petastorm + Horovod training, AUROC in Delta",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    entry_points={"console_scripts": [f"{command} = cxr_pipeline.cli:{CLI['function_name'](command)}"
                                      for command in CLI["COMMANDS"]]},
    # The base requirements accept what the one runtime the bundle's jobs run already ships
    # (Databricks Runtime 15.4 LTS ML: numpy 1.23.5, pandas 1.5.3, pyarrow 14.0.1), so installing the wheel on a
    # cluster never replaces the libraries Spark runs on; what that runtime lacks is in
    # jobs/cluster-requirements.txt. Local installs pin exact versions in install/requirements.txt.
    install_requires=[
        "numpy>=1.23,<2",  # petastorm 0.13.1 fails with numpy 2
        "pyarrow>=11",
        "pandas>=1.5",
        "pillow>=9.1",
        "pyyaml",
    ],
    extras_require={
        "etl": ["pyspark>=3.5,<4.1"],  # pyspark 4.1+ requires pyarrow >= 18
        # Delta on Spark outside Databricks (training/evaluation/results.py's delta-spark engine, jobs/score.py):
        # the Python API; the jars come with install/delta_jars.sh, or from Maven at session start (etl/sessions.py)
        "delta": ["delta-spark>=3.2,<4.1"],
        # optional faster PNG/JPEG decode + resize (etl/images.py; Pillow stays the fallback). An extra,
        # not a base requirement: runtimes that ship opencv-python would get a second cv2. 4.12+ needs numpy 2.
        "opencv": ["opencv-python-headless>=4.11,<4.12"],
        # training-only: the ML runtimes ship these; petastorm 0.13.1 needs pyarrow < 15
        "train": ["torch>=2.1", "torchvision", "scikit-learn", "deltalake>=1.0", "tqdm", "matplotlib",
                  "pyarrow<15", "mlflow>=2.16"],
        # MLflow tracking, the pyfunc model and jobs/score.py; the ML runtimes ship it. The full package: the
        # local store (SQLite) needs its SQLAlchemy, and `mlflow ui` comes with it. Tested with 3.17.2.
        "mlflow": ["mlflow>=2.16"],
    },
)

"""MLflow tracking of a training run: what train.py logs, from rank 0 only.

On by default (`--no-mlflow` turns it off). Where the run goes:
- MLFLOW_TRACKING_URI when it is set (a tracking server, or `databricks`); on a Databricks runtime
  without it, the workspace (`databricks`);
- otherwise a local store in the run's folder: RUN_DIR/mlflow/mlflow.db (SQLite: MLflow 3 refuses its old
  file store unless told otherwise) with artifacts in RUN_DIR/mlflow/mlartifacts, seen with
  `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db` (or `mlflow runs list`). To see many
  runs side by side, point them at one store: MLFLOW_TRACKING_URI=sqlite:///$PWD/outputs/mlflow.db (its
  artifacts then go beside that file; runs that start together take turns to create it).

What one MLflow run holds: the resolved configuration as parameters; tags with this run's id and folder
(`cxr_run_id`, `cxr_run_dir`), the launcher and the environment (Python, torch, CUDA, every installed
package under environment/); per epoch, each stage's training and validation figures as metrics named
`<stage>/<figure>` with step = epoch; at the end of each stage, every numeric figure of its Delta rows
(training/evaluation/metric_columns.py) per label and for the mean (`<stage>/<split>/<figure>/<label>`), the
rows, the ROC and reliability plots and the operating-point and calibration tables (under `<stage>/`); at the
end, report.html, the AUROC table, the training curves, Grad-CAM overlays of a few test images (gradcam/),
and the best checkpoint of the last stage as a pyfunc model (training/serving/mlflow_model.py), registered
under `--register-model NAME` when given. Every Delta AUROC row carries the MLflow run id (`mlflow_run_id`).

A run interrupted and continued with --resume goes on in the same MLflow run. A tracking server that
fails mid-run costs warnings, never the training: only starting the run and logging the model fail loudly.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.training.evaluation import metric_columns

log = logging.getLogger("tracking")
RUN_TAG, RUN_DIR_TAG = "cxr_run_id", "cxr_run_dir"
LOCAL_FOLDER, LOCAL_STORE, LOCAL_ARTIFACTS = "mlflow", "mlflow.db", "mlartifacts"  # RUN_DIR/mlflow/...
STAGE_FILES = ("roc_{stage}_*.png", "reliability_{stage}_*.png", "operating_points_{stage}.csv",
               "calibration_{stage}.csv")
RUN_FILES = ("report.html", "config.yaml", "summary.csv", "training_curves.png")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value
METRIC_NAME = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in metric names


def add_arguments(parser) -> None:
    group = parser.add_argument_group("experiment tracking (MLflow; training/serving/tracking.py)")
    group.add_argument("--no-mlflow", action="store_true",
                       help="do not log to MLflow (default: log to MLFLOW_TRACKING_URI, else to "
                            f"RUN_DIR/{LOCAL_FOLDER}/{LOCAL_STORE})")
    group.add_argument("--mlflow-experiment",
                       help="experiment name (default: $MLFLOW_EXPERIMENT_NAME, else cxr-<dataset>; on Databricks "
                            "/Shared/cxr-<dataset>)")
    group.add_argument("--register-model", metavar="NAME",
                       help="also register the logged model in the model registry under NAME (Unity Catalog: "
                            "catalog.schema.model)")


class NoTracking:
    """What ranks other than 0, and runs with --no-mlflow, get: every call does nothing."""

    run_id = None

    def log_epoch(self, stage: str, epoch: int, row: dict) -> None:
        pass

    def log_stage(self, stage: str, rows: list[dict]) -> None:
        pass

    def finish(self, stage: str) -> None:
        pass


def start(args, run_dir: Path, spec, dist):
    """The run's tracker: MLflow on rank 0 unless --no-mlflow, else a NoTracking."""
    if getattr(args, "no_mlflow", False):
        if getattr(args, "register_model", None):
            raise SystemExit("--register-model needs MLflow: leave out --no-mlflow")
        return NoTracking()
    if not dist.is_main:
        return NoTracking()
    try:
        return MlflowTracking(args, Path(run_dir), spec, dist)
    except ImportError as exc:
        raise SystemExit(f"MLflow tracking needs {exc.name or exc}: pip install -r install/requirements.txt (or "
                         "'.[mlflow]'), or train with --no-mlflow") from None


def tracking_uri(run_dir: Path) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return "databricks"
    return f"sqlite:///{Path(run_dir).resolve() / LOCAL_FOLDER / LOCAL_STORE}"


def registry_uri(tracking: str) -> str | None:
    """The model registry of a tracking URI: MLFLOW_REGISTRY_URI when set; Unity Catalog (`databricks-uc`) for a
    Databricks workspace, pinned rather than left to MLflow's default, which a cluster's
    spark.mlflow.modelRegistryUri or an MLflow 2 client turns into the workspace registry; a local SQLite store
    is its own registry; else MLflow's default for the server."""
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        return os.environ["MLFLOW_REGISTRY_URI"]
    if tracking == "databricks" or tracking.startswith("databricks://"):
        return "databricks-uc"
    return tracking if sqlite_file(tracking) else None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store (sqlite:////abs/path.db, sqlite:///relative.db), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(path: Path | None):
    """Runs that start together into one SQLite store (training.sweep's cells, with MLFLOW_TRACKING_URI set)
    must not both create it: MLflow's table migrations would collide."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def metric_name(*parts) -> str:
    return METRIC_NAME.sub("_", "/".join(str(part) for part in parts))


def finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def environment() -> tuple[dict, str]:
    """(facts about this machine and its libraries, `pip freeze`-like list of every installed package)."""
    import torch

    facts = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    for name in ("mlflow-skinny", "mlflow", "pyspark", "pyarrow", "numpy", "deltalake", "petastorm", "horovod"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts[name] = metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            facts["git_commit"] = commit.stdout.strip()
    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]},
                      key=str.lower)
    return facts, "\n".join(packages) + "\n"


class MlflowTracking:
    def __init__(self, args, run_dir: Path, spec, dist):
        import mlflow
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.args, self.run_dir, self.spec = args, run_dir, spec
        self.uri = tracking_uri(run_dir)
        store = sqlite_file(self.uri)
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
        self.registry_uri = registry_uri(self.uri)
        name = (args.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                or ("/Shared/" if self.uri.startswith("databricks") else "") + f"cxr-{spec.dataset}")
        artifacts = (store.parent.resolve() / LOCAL_ARTIFACTS).as_uri() if store else None  # beside the database
        try:
            with store_lock(store.with_name(store.name + ".lock") if store else None):
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri)  # makes the store
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (experiment.experiment_id if experiment
                                 else self.client.create_experiment(name, artifact_location=artifacts))
                earlier = self.client.search_runs([experiment_id], f"tags.{RUN_TAG} = '{args.run_id}'",
                                                  max_results=1) if args.resume else []
        except mlflow.exceptions.MlflowException as exc:
            raise SystemExit(f"MLflow tracking at {self.uri} failed: {exc}\nfix MLFLOW_TRACKING_URI (and its "
                             "credentials) or train with --no-mlflow") from None
        self.rows: list[dict] = []
        self.finished = False
        if earlier:  # --resume: the same MLflow run goes on
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "cxr_resumed_from", str(args.resume))
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=args.run_id, tags={
                RUN_TAG: args.run_id, RUN_DIR_TAG: str(run_dir.resolve()), "cxr_dataset": str(args.dataset),
                "cxr_dataset_version": str(args.dataset_version),
                "cxr_backend": dist.name, "cxr_world_size": str(dist.size)}).info.run_id
            self.log_parameters(vars(args))
            self.log_environment()
        atexit.register(self.close)  # a run that dies before finish() is marked FAILED
        log.info("MLflow run %s in experiment %r at %s", self.run_id, name, self.uri)

    # ---- during training ------------------------------------------------------------------------
    def log_parameters(self, values: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in sorted(values.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_environment(self) -> None:
        from mlflow.entities import RunTag

        facts, packages = environment()
        self.client.log_batch(self.run_id, tags=[RunTag(f"env_{key}", str(value)) for key, value in facts.items()])
        self.client.log_text(self.run_id, json.dumps(facts, indent=2), "environment/environment.json")
        self.client.log_text(self.run_id, packages, "environment/requirements.txt")

    def log_metrics(self, values: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items() if finite(value)]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_epoch(self, stage: str, epoch: int, row: dict) -> None:
        """summary.csv's row of the epoch as `<stage>/<column>` metrics at step `epoch`."""
        with self.tolerated(f"{stage} epoch {epoch}"):
            self.log_metrics({metric_name(stage, key): value for key, value in row.items()
                              if key not in ("stage", "epoch")}, step=epoch)

    def log_stage(self, stage: str, rows: list[dict]) -> None:
        """The stage's Delta rows, every figure of every label (and the mean) as a metric
        `<stage>/<split>/<figure>/<label>`, then the rows, plots and tables."""
        self.rows += rows
        with self.tolerated(f"{stage} results"):
            values = {}
            for row in rows:
                for metric in metric_columns.names("ratio") + metric_columns.names("count"):
                    values[metric_name(stage, row["split"], metric, row["label"])] = row.get(metric)
                values[metric_name(stage, "best_epoch")] = row.get("best_epoch")
            self.log_metrics(values)
            self.client.log_text(self.run_id, pd.DataFrame(rows).to_csv(index=False), f"{stage}/auroc_rows.csv")
            for pattern in STAGE_FILES:
                for path in sorted(self.run_dir.glob(pattern.format(stage=stage))):
                    self.client.log_artifact(self.run_id, str(path), stage)

    # ---- at the end -----------------------------------------------------------------------------
    def finish(self, stage: str) -> None:
        """Report, AUROC table, Grad-CAM examples, and the model of the last stage's best checkpoint."""
        from cxr_pipeline.training.evaluation.results import auroc_table

        for name in RUN_FILES:
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if self.rows:
            table = auroc_table(pd.DataFrame(self.rows))
            table.columns = [f"{stage_}/{split}" for stage_, split in table.columns]
            self.client.log_text(self.run_id, table.to_csv(float_format="%.4f"), "auroc_table.csv")
            self.client.log_table(self.run_id, table.reset_index(), "auroc_table.json")
        checkpoint = self.run_dir / f"best_{stage}.pth"
        if not checkpoint.exists():
            log.warning("no %s (no epoch had a val AUROC): no model logged to MLflow", checkpoint.name)
        else:
            with self.tolerated("Grad-CAM examples"):
                from cxr_pipeline.training.explain import overlays

                folder = overlays.write_examples(checkpoint, self.args.dataset, self.run_dir / "gradcam")
                if folder is not None:
                    self.client.log_artifacts(self.run_id, str(folder), "gradcam")
            self.log_model(checkpoint)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def log_model(self, checkpoint: Path) -> None:
        import mlflow

        from cxr_pipeline.training.serving import mlflow_model

        mlflow.set_tracking_uri(self.uri)
        if self.registry_uri:
            mlflow.set_registry_uri(self.registry_uri)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow_model.log_model(checkpoint, registered_model_name=self.args.register_model,
                                     tags={RUN_TAG: self.args.run_id, "checkpoint": checkpoint.name,
                                           "dataset_version": str(self.args.dataset_version)})
        self.client.set_tag(self.run_id, "cxr_model_uri", info.model_uri)
        registered = getattr(info, "registered_model_version", None)
        log.info("MLflow model %s%s", info.model_uri,
                 f", registered as models:/{self.args.register_model}/{registered}" if registered else "")

    def close(self) -> None:
        if not self.finished:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, "FAILED")
            self.finished = True

    @contextlib.contextmanager
    def tolerated(self, what: str):
        """Logging that may fail without stopping the training (a tracking server gone mid-run)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the training matters more than its log
            log.warning("MLflow: could not log %s (%s: %s); training goes on", what, type(exc).__name__, exc)

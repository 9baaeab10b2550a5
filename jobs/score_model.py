"""jobs/score.py's model, on the driver: the registry URI pinned to one immutable version, downloaded once (the
executors get the folder through SparkFiles), and the dataset spec its metadata carries."""
from __future__ import annotations

import re
import uuid
from pathlib import Path

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.evaluation.results import quoted


class NoModelVersion(Exception):
    """The registry has no version under the name and alias (or `latest`) asked for: nothing to score with yet."""


def pin_registry() -> None:
    """MLflow's registry for resolving and downloading `models:/` URIs: the one training registers in
    (training.serving.tracking.registry_uri: Unity Catalog when tracking goes to Databricks)."""
    import mlflow

    from cxr_pipeline.training.serving.tracking import registry_uri

    registry = registry_uri(mlflow.get_tracking_uri())
    if registry:
        mlflow.set_registry_uri(registry)


def resolve_model_uri(uri: str) -> str:
    """A URI that names one immutable model: registry aliases and `latest` become the version they point at;
    a local folder becomes its absolute path. NoModelVersion when none exists yet."""
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        return str(Path(uri).resolve())
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(latest))", uri)
    if not match:
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name, alias = match.group(1), match.group(2)
    if alias:
        try:
            version = client.get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            # No such alias: INVALID_PARAMETER_VALUE (SQL store) or RESOURCE_DOES_NOT_EXIST / NOT_FOUND (a missing
            # model, Unity Catalog); anything else (credentials, network) is a real failure.
            if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            raise NoModelVersion(f"no version of {name!r} carries the alias {alias!r} yet ({exc.error_code}). "
                                 f"Promote one: MlflowClient().set_registered_model_alias({name!r}, {alias!r}, "
                                 "VERSION), or in Catalog Explorer") from None
    else:
        versions = client.search_model_versions(f"name = {quoted(name)}")
        if not versions:
            raise NoModelVersion(f"the registry has no version of {name!r} yet: register one with train.py "
                                 "--register-model")
        version = max(int(v.version) for v in versions)
    return f"models:/{name}/{version}"


def download_model(uri: str, scratch: Path) -> Path:
    """The model's folder on the driver, under a name of its own (executors find it by that name in SparkFiles)."""
    import mlflow

    folder = scratch / f"cxr-model-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
    return folder


def model_spec(folder: Path) -> DatasetSpec:
    from mlflow.models import Model

    spec = (Model.load(str(folder / "MLmodel")).metadata or {}).get("dataset_spec")
    if not spec:
        raise SystemExit(f"{folder}: not a model logged by training/serving/mlflow_model.py "
                         "(no dataset_spec in its metadata)")
    return DatasetSpec.from_json(spec)

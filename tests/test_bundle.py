"""The Databricks bundle as `databricks bundle validate/deploy` reads it: every target resolved,
each job loaded with databricks-bundles' resource classes (they refuse unknown fields), the
wheel built exactly as the bundle's `artifacts` section says from a clean checkout, and every
path it names present there. A deliberately broken copy must fail each check."""
import glob
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from databricks.bundles.experiments import MlflowExperiment
from databricks.bundles.jobs import Job
from databricks.bundles.registered_models import RegisteredModel
from databricks.bundles.schemas import Schema
from databricks.bundles.volumes import Volume

from conftest import ROOT

DEDICATED = {"SINGLE_USER", "DATA_SECURITY_MODE_DEDICATED"}
RUNTIME_REFERENCE = re.compile(r"\{\{[\w.]+\}\}")  # filled in by the Jobs service at run time, e.g. {{job.run_id}}
SECRET_REFERENCE = re.compile(r"\{\{secrets/[\w.-]+/[\w.-]+\}\}")  # filled in from a secret scope at cluster start
PROD_VARIABLES = {"service_principal": "00000000-0000-0000-0000-000000000000"}
DEPLOYER = {"userName": "alice@example.org", "short_name": "alice"}  # who runs `databricks bundle deploy`
WORKSPACE_HOST = "https://workspace.example"
# resource type -> the databricks-bundles class that loads it (unknown fields and privileges are refused)
RESOURCE_CLASSES = {"jobs": Job.from_dict, "schemas": Schema.from_dict, "volumes": Volume.from_dict,
                    "registered_models": RegisteredModel.from_dict, "experiments": MlflowExperiment.from_dict}


def load_bundle(root: Path) -> tuple[dict, dict[str, Path]]:
    """databricks.yml with its included files merged in; and where each job was defined (paths
    in a bundle file are relative to that file)."""
    bundle = yaml.safe_load((root / "databricks.yml").read_text())
    defined_in = {}
    for pattern in bundle.get("include", []):
        for path in sorted(root.glob(pattern)):
            part = yaml.safe_load(path.read_text())
            unknown = set(part) - {"resources", "variables", "targets"}
            assert not unknown, f"{path.name}: top-level keys a bundle does not know: {unknown}"
            declared = set(part.get("variables") or {}) & set(bundle.get("variables") or {})
            assert not declared, f"{path.name}: variables declared twice: {declared}"
            bundle.setdefault("variables", {}).update(part.get("variables") or {})
            for kind, resources in (part.get("resources") or {}).items():
                assert kind in RESOURCE_CLASSES, f"{path.name}: resource type {kind} not checked here"
                for name, resource in resources.items():
                    bundle.setdefault("resources", {}).setdefault(kind, {})[name] = resource
                    if kind == "jobs":
                        defined_in[name] = path.parent
    return bundle, defined_in


def resolve(node, values: dict):
    """${...} references substituted everywhere; unknown ones fail."""
    if isinstance(node, dict):
        return {key: resolve(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, values) for value in node]
    if isinstance(node, str):
        def value(match):
            assert match.group(1) in values, f"unknown reference ${{{match.group(1)}}}"
            return str(values[match.group(1)])
        return re.sub(r"\$\{([\w.]+)\}", value, node)
    return node


def merged(base: dict, override: dict) -> dict:
    """A target's resource overrides merged into the top-level definitions, key by key."""
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def development_names(resources: dict, short_name: str) -> dict:
    """What `mode: development` does to names (databricks/cli bundle/config/mutator/resourcemutator/
    apply_presets.go): schemas and registered models get the prefix dev_<user>_, experiments [dev <user>] before
    the last part of their path."""
    resources = json.loads(json.dumps(resources))
    for kind in ("schemas", "registered_models"):
        for resource in resources.get(kind, {}).values():
            resource["name"] = f"dev_{short_name}_{resource['name']}"
    for resource in resources.get("experiments", {}).values():
        folder, _, base = resource["name"].rpartition("/")
        resource["name"] = f"{folder}/[dev {short_name}] {base}"
    return resources


def target_values(bundle: dict, target: str) -> tuple[dict, dict, dict]:
    """(the target's settings, its resources with every reference resolved, the values references take)."""
    settings = bundle["targets"][target]
    variables = {name: spec.get("default") for name, spec in bundle["variables"].items()}
    variables.update(settings.get("variables", {}))
    if target == "prod":
        variables.update(PROD_VARIABLES)
    missing = [name for name, value in variables.items() if value is None]
    assert not missing, f"target {target}: variables without a value {missing}"
    values = {f"var.{name}": value for name, value in variables.items()}
    values.update({"bundle.name": bundle["bundle"]["name"], "bundle.target": target,
                   "workspace.host": WORKSPACE_HOST, "workspace.current_user.userName": DEPLOYER["userName"],
                   "workspace.current_user.short_name": DEPLOYER["short_name"]})
    values = {key: resolve(value, values) if isinstance(value, str) else value for key, value in values.items()}
    settings = resolve(settings, values)
    values["workspace.root_path"] = settings.get("workspace", {}).get(
        "root_path", f"/Workspace/Users/{DEPLOYER['userName']}/.bundle/{bundle['bundle']['name']}/{target}")
    resources = merged(bundle["resources"], settings.get("resources", {}))
    if settings.get("mode") == "development":
        resources = development_names(resources, DEPLOYER["short_name"])
    catalog_objects = {kind: items for kind, items in resources.items() if kind != "jobs"}
    for _ in range(2):  # resources refer to each other (a volume to its schema) one level deep
        catalog_objects = resolve(catalog_objects, {**values, **{
            f"resources.{kind}.{name}.{field}": value for kind, items in catalog_objects.items()
            for name, resource in items.items() for field, value in resource.items() if isinstance(value, str)}})
        values.update({f"resources.{kind}.{name}.{field}": value for kind, items in catalog_objects.items()
                       for name, resource in items.items() for field, value in resource.items()
                       if isinstance(value, str)})
    return settings, resolve(resources, values), values


def target_view(bundle: dict, target: str) -> tuple[dict, dict[str, Job]]:
    """(the target's settings, jobs by name) with the target's variables applied."""
    settings, resources, _ = target_values(bundle, target)
    return settings, {name: Job.from_dict(job) for name, job in resources["jobs"].items()}


def clean_checkout(tmp_path: Path) -> Path:
    """The files git would give a fresh clone (tracked, plus new files not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    checkout = tmp_path / "checkout"
    for name in listed:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    return checkout


def build_artifacts(root: Path, bundle: dict) -> None:
    for name, artifact in bundle["artifacts"].items():
        subprocess.run(artifact["build"], shell=True, cwd=root / artifact["path"], check=True, capture_output=True)


def problems(root: Path) -> list[str]:
    """Everything that would stop `databricks bundle deploy` or make it deploy wrong."""
    found = []
    try:
        bundle, defined_in = load_bundle(root)
        views = {target: target_view(bundle, target) for target in bundle["targets"]}
        for target in bundle["targets"]:
            for kind, items in target_values(bundle, target)[1].items():
                for resource in items.values():
                    RESOURCE_CLASSES[kind](resource)
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        return [f"does not load: {exc}"]
    for target, (settings, jobs) in views.items():
        for name, job in jobs.items():
            for cluster in job.job_clusters:
                mode = getattr(cluster.new_cluster.data_security_mode, "value", cluster.new_cluster.data_security_mode)
                if mode not in DEDICATED:
                    found.append(f"{target}/{name}/{cluster.job_cluster_key}: data_security_mode {mode}, not dedicated")
            for task in job.tasks:
                folder = defined_in[name]
                if not (folder / task.spark_python_task.python_file).resolve().is_file():
                    found.append(f"{name}/{task.task_key}: {task.spark_python_task.python_file} does not exist")
                for library in task.libraries:
                    local = library.whl or library.requirements
                    if not local:
                        continue
                    if not glob.glob(str(folder / local)):
                        found.append(f"{name}/{task.task_key}: {local} matches no "
                                     f"{'built wheel' if library.whl else 'file'}")
                    elif not (folder / local).resolve().is_relative_to(root.resolve()):
                        found.append(f"{name}/{task.task_key}: {local} lies outside the bundle root")
    return found


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = clean_checkout(tmp_path_factory.mktemp("bundle"))
    build_artifacts(root, load_bundle(root)[0])
    return root


def test_the_bundle_deploys_as_written_from_a_clean_checkout(checkout):
    assert problems(checkout) == []
    (wheel,) = (checkout / "dist").glob("*.whl")  # built inside the bundle root, from setup.py
    names = zipfile.ZipFile(wheel).namelist()
    assert "cxr_pipeline/etl/preprocess.py" in names and "cxr_pipeline/training/train.py" in names
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"cxr_pipeline"}


def test_targets_schedules_identity_and_results_table():
    bundle, _ = load_bundle(ROOT)
    dev_settings, dev = target_view(bundle, "dev")
    prod_settings, prod = target_view(bundle, "prod")
    assert set(prod) == set(dev) == {"cxr_etl_nightly", "cxr_train_weekly", "cxr_chexpert_selftrained", "cxr_sweep",
                                     "cxr_score_nightly"}
    for jobs in (dev, prod):
        for job in jobs.values():
            assert job.schedule.timezone_id and job.email_notifications.on_failure and job.max_concurrent_runs == 1
            assert all(task.max_retries >= 1 and task.timeout_seconds > 0 for task in job.tasks)
    # schedules stay paused unless a target turns them on; only prod does, and never the on-demand job
    assert {job.schedule.pause_status.value for job in dev.values()} == {"PAUSED"}
    assert prod["cxr_etl_nightly"].schedule.pause_status.value == "UNPAUSED"
    assert prod["cxr_train_weekly"].schedule.pause_status.value == "UNPAUSED"
    assert prod["cxr_chexpert_selftrained"].schedule.pause_status.value == "PAUSED"
    assert prod["cxr_sweep"].schedule.pause_status.value == "PAUSED"
    assert prod["cxr_score_nightly"].schedule.pause_status.value == "UNPAUSED"
    assert prod_settings["run_as"]["service_principal_name"] == PROD_VARIABLES["service_principal"]
    assert prod_settings["permissions"] and prod_settings["mode"] == "production"
    # the AUROC rows go to a Unity Catalog table by name, written by the driver (train_distributor's own flag)
    for job in (prod["cxr_train_weekly"], prod["cxr_chexpert_selftrained"], prod["cxr_sweep"]):
        for task in job.tasks:
            parameters = task.spark_python_task.parameters
            if task.spark_python_task.python_file.endswith("train_distributor.py"):
                assert parameters[parameters.index("--results-table") + 1] == "main.cxr.auroc_results"
                assert parameters.index("--results-table") < parameters.index("--")  # the driver publishes


def test_prod_deploys_into_the_service_principals_own_folder():
    """Review point 5: under /Workspace/Shared every workspace user could change what the prod jobs run."""
    settings, _ = target_view(load_bundle(ROOT)[0], "prod")
    root = settings["workspace"]["root_path"]
    assert root.startswith(f"/Workspace/Users/{PROD_VARIABLES['service_principal']}/"), root
    assert "/Shared" not in root


def catalog_names(jobs: dict[str, Job]) -> set[str]:
    """Every volume path, table and model name the jobs' parameters use (their catalog.schema part)."""
    found = set()
    for job in jobs.values():
        for task in job.tasks:
            for parameter in task.spark_python_task.parameters:
                found.update(re.findall(r"/Volumes/(\w+/\w+)", parameter))
                found.update(name.replace(".", "/") for name in re.findall(r"^(?:models:/)?(\w+\.\w+)\.\w+(?:@\w+)?$",
                                                                            parameter))
    return found


def test_dev_and_prod_share_no_data_path_table_or_model():
    """Review point 4: per-target catalog and schema; every path, table and model a job names lies in its target's
    own schema, the one the bundle creates (development mode prefixes it with the deploying user)."""
    bundle, _ = load_bundle(ROOT)
    places = {}
    for target in ("dev", "prod"):
        _, resources, _ = target_values(bundle, target)
        (schema,) = resources["schemas"].values()
        places[target] = catalog_names({name: Job.from_dict(job) for name, job in resources["jobs"].items()})
        assert places[target] == {f"{schema['catalog_name']}/{schema['name']}"}, (target, places[target])
        (model,) = resources["registered_models"].values()
        assert model["schema_name"] == schema["name"]
        assert {volume["schema_name"] for volume in resources["volumes"].values()} == {schema["name"]}
    assert not places["dev"] & places["prod"]
    assert bundle["targets"]["dev"]["variables"]["schema"] != bundle["targets"]["prod"]["variables"]["schema"]


def test_the_bundle_creates_schema_volumes_model_and_experiment_with_grants_for_the_service_principal():
    """Review point 8: nothing had created them, nor let the jobs' identity use them."""
    bundle, _ = load_bundle(ROOT)
    _, resources, _ = target_values(bundle, "prod")
    principal = PROD_VARIABLES["service_principal"]
    (schema,) = resources["schemas"].values()
    granted = {grant["principal"]: set(grant["privileges"]) for grant in schema["grants"]}
    assert {"USE_SCHEMA", "CREATE_TABLE", "MODIFY", "SELECT", "CREATE_MODEL", "READ_VOLUME",
            "WRITE_VOLUME"} <= granted[principal]
    assert set(resources["volumes"]) == {"raw", "processed", "incoming"}
    (model,) = resources["registered_models"].values()
    assert {"ALL_PRIVILEGES"} <= {p for g in model["grants"] if g["principal"] == principal for p in g["privileges"]}
    (experiment,) = resources["experiments"].values()
    assert {"service_principal_name": principal, "level": "CAN_MANAGE"} in experiment["permissions"]
    weekly = Job.from_dict(resources["jobs"]["cxr_train_weekly"])
    environment = weekly.job_clusters[0].new_cluster.spark_env_vars
    assert environment["MLFLOW_EXPERIMENT_NAME"] == experiment["name"]  # the runs go to the experiment it made


def test_one_ml_runtime_for_every_job_and_each_library_declared_where_the_cluster_installs_it():
    """Review point 6: runtimes disagreed and petastorm was declared nowhere. One runtime, the one setup.py's
    ranges name; every task installs the wheel and cluster-requirements.txt, which lists petastorm and MLflow
    and pins them as install/requirements.txt does."""
    _, jobs = target_view(load_bundle(ROOT)[0], "prod")
    versions = {cluster.new_cluster.spark_version for job in jobs.values() for cluster in job.job_clusters}
    assert {re.sub(r"-(cpu|gpu)-", "-", version) for version in versions} == {"15.4.x-ml-scala2.12"}, versions
    assert "Databricks Runtime 15.4 LTS ML" in (ROOT / "setup.py").read_text()
    requirements = ROOT / "jobs" / "cluster-requirements.txt"
    for job in jobs.values():
        for task in job.tasks:
            declared = {(library.whl, library.requirements) for library in task.libraries}
            assert declared == {("../dist/*.whl", None), (None, "./cluster-requirements.txt")}, task.task_key
    pins = dict(line.split("==") for line in requirements.read_text().splitlines() if line and not line.startswith("#"))
    local = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "install" / "requirements.txt")
                 .read_text().splitlines() if "==" in line and not line.startswith("#"))
    local["petastorm"] = "0.13.1"  # installed --no-deps by install/setup_env.sh
    assert {"petastorm", "mlflow"} <= set(pins)
    assert {name: local.get(name) for name in pins} == pins


def test_training_workers_get_mlflow_credentials_from_a_secret_scope_and_use_unity_catalog():
    """Review points 2 and 3: rank 0 runs torchrun on a worker, where MLflow needs the workspace host and a token;
    the token comes from a secret scope (never a literal), and the registry is pinned to Unity Catalog in the
    training clusters, the scoring cluster and the code (training.serving.tracking.registry_uri)."""
    from cxr_pipeline.training.serving.tracking import registry_uri

    _, jobs = target_view(load_bundle(ROOT)[0], "prod")
    for name, job in jobs.items():
        for cluster in job.job_clusters:
            environment = cluster.new_cluster.spark_env_vars or {}
            runs_training = any(task.spark_python_task.python_file.endswith("train_distributor.py")
                                for task in job.tasks if task.job_cluster_key == cluster.job_cluster_key)
            if runs_training:
                assert environment["DATABRICKS_HOST"] == WORKSPACE_HOST, (name, cluster.job_cluster_key)
                assert SECRET_REFERENCE.fullmatch(environment["DATABRICKS_TOKEN"]), environment["DATABRICKS_TOKEN"]
                assert environment["MLFLOW_TRACKING_URI"] == "databricks"
            if runs_training or name == "cxr_score_nightly":
                assert environment["MLFLOW_REGISTRY_URI"] == "databricks-uc", (name, cluster.job_cluster_key)
    assert registry_uri("databricks") == "databricks-uc" and registry_uri("databricks://profile") == "databricks-uc"


def test_a_retried_training_task_keeps_its_run_id_resumes_and_replaces_its_rows(tmp_path):
    """Review point 7: every training task names its run after the job run ({{job.run_id}}, the same for each
    retry of a task), so a retry finds the folder; train_distributor then resumes from its checkpoint. (The
    replacement of the run's rows: test_delta_engines.py; a real retry through TorchDistributor:
    test_training.py.)"""
    from cxr_pipeline.jobs.train_distributor import driver_owned_run

    _, jobs = target_view(load_bundle(ROOT)[0], "prod")
    for job in jobs.values():
        for task in job.tasks:
            parameters = task.spark_python_task.parameters
            if task.spark_python_task.python_file.endswith("train_distributor.py"):
                run_id = parameters[parameters.index("--run-id") + 1]
                assert run_id.startswith("{{job.run_id}}"), (task.task_key, run_id)
    args, run_dir, run_id, _ = driver_owned_run(["--dataset", "d", "--output-dir", str(tmp_path), "--run-id", "42"])
    assert "--resume" not in args and args[-2:] == ["--results-table", "none"]
    (run_dir / "checkpoint.pth").parent.mkdir(parents=True)
    (run_dir / "checkpoint.pth").write_bytes(b"")
    again, _, _, _ = driver_owned_run(["--dataset", "d", "--output-dir", str(tmp_path), "--run-id", "42"])
    assert again[again.index("--resume") + 1] == str(run_dir / "checkpoint.pth")


def test_self_trained_job_chains_first_pass_relabel_second_pass_on_the_same_files():
    _, jobs = target_view(load_bundle(ROOT)[0], "dev")
    first, relabel, second = jobs["cxr_chexpert_selftrained"].tasks
    assert [d.task_key for d in relabel.depends_on] == ["first_pass"]
    assert [d.task_key for d in second.depends_on] == ["relabel"]
    first_args, relabel_args, second_args = (t.spark_python_task.parameters for t in (first, relabel, second))
    assert "--predict-train" in first_args and relabel.spark_python_task.python_file.endswith("etl/uncertainty.py")
    run_dir = f"{first_args[first_args.index('--output-dir') + 1]}/{first_args[first_args.index('--run-id') + 1]}"
    assert relabel_args[relabel_args.index("--predictions") + 1] == f"{run_dir}/predictions_finetune_train.csv"
    assert relabel_args[relabel_args.index("--dataset") + 1] == first_args[first_args.index("--dataset") + 1]
    assert second_args[second_args.index("--dataset") + 1] == relabel_args[relabel_args.index("--output") + 1]
    assert all(not RUNTIME_REFERENCE.sub("", a).count("{") for a in first_args)


def test_sweep_job_trains_every_grid_cell_in_parallel_after_its_etl_then_compares_them_all():
    """cxr_sweep: an ETL task per size; a training task per (model, size) cell on a GPU cluster of its own that
    waits only for its size's ETL; a compare task after all of them, even failed ones. Every task's parameters
    parse with the argparse of the command it runs, and the compare task reads where the training tasks write."""
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.etl.preprocess import build_parser as etl_parser
    from cxr_pipeline.jobs.train_distributor import driver_owned_run
    from cxr_pipeline.training import sweep
    from cxr_pipeline.training.train import build_parser as train_parser

    _, jobs = target_view(load_bundle(ROOT)[0], "prod")
    tasks = {task.task_key: task for task in jobs["cxr_sweep"].tasks}
    parameters = {key: task.spark_python_task.parameters for key, task in tasks.items()}
    compare = sweep.resolve(parameters["compare"])
    cells = sweep.make_grid(compare)
    sizes = sorted({cell.size for cell in cells})
    assert compare.compare_only and sizes == [256, 512]
    assert {cell.model for cell in cells} == {"resnet50", "densenet121"}
    trains = {f"train_{cell.model}_{cell.size}": cell for cell in cells}
    assert set(tasks) == {f"etl_{size}" for size in sizes} | set(trains) | {"compare"}
    assert tasks["compare"].spark_python_task.python_file.endswith("training/sweep.py")
    assert {d.task_key for d in tasks["compare"].depends_on} == set(trains)
    assert getattr(tasks["compare"].run_if, "value", tasks["compare"].run_if) == "ALL_DONE"
    datasets = sweep.parse_datasets(compare.dataset)
    for size in sizes:
        etl = parse_args(etl_parser(), "etl", parameters[f"etl_{size}"])
        assert not tasks[f"etl_{size}"].depends_on and tasks[f"etl_{size}"].spark_python_task.python_file.endswith(
            "etl/preprocess.py")
        assert (etl.size, etl.output, etl.overwrite) == (size, datasets[size], True)
    clusters = {cluster.job_cluster_key: cluster.new_cluster for cluster in jobs["cxr_sweep"].job_clusters}
    for key, cell in trains.items():
        task = tasks[key]
        assert [d.task_key for d in task.depends_on] == [f"etl_{cell.size}"]  # never on another cell: parallel
        assert "gpu" in clusters[task.job_cluster_key].spark_version
        assert [t.job_cluster_key for t in tasks.values()].count(task.job_cluster_key) == 1  # a cluster of its own
        args = parameters[key]
        assert task.spark_python_task.python_file.endswith("jobs/train_distributor.py") and "--use-gpu" in args
        train_args, run_dir, run_id, _ = driver_owned_run(args[args.index("--") + 1:])
        train = parse_args(train_parser(), "train", train_args)
        assert (train.dataset, train.model, train.stages) == (cell.dataset, cell.model, compare.stages)
        assert (run_id, train.output_dir) == (cell.run_id, str(cell.run_dir.parent))
        assert run_dir == cell.run_dir  # compare reads the rows the run keeps there (RUN_DIR/auroc_rows.parquet)
        assert cell.run_id == "{{job.run_id}}-" + f"{cell.model}-{cell.size}"


def test_scoring_job_scores_new_images_nightly_with_the_registered_model_into_a_catalog_table(monkeypatch):
    """cxr_score_nightly: jobs/score.py on the ML runtime, its parameters parsed by the job's own argparse: a
    registry alias it resolves to a fixed version, the incoming volume, and a Unity Catalog table, which the
    default engine writes through Delta on Spark on Databricks (never delta-rs on a volume)."""
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.jobs.score import build_parser as score_parser
    from cxr_pipeline.jobs.score_model import resolve_model_uri
    from cxr_pipeline.training.evaluation.results import resolve_engine
    from cxr_pipeline.training.train import build_parser as train_parser

    _, resources, _ = target_values(load_bundle(ROOT)[0], "prod")
    jobs = {name: Job.from_dict(job) for name, job in resources["jobs"].items()}
    job = jobs["cxr_score_nightly"]
    (task,) = job.tasks
    assert task.spark_python_task.python_file.endswith("jobs/score.py") and not task.depends_on
    assert re.fullmatch(r"0 \d+ \d+ \* \* \?", job.schedule.quartz_cron_expression)  # every day
    (cluster,) = job.job_clusters
    assert "-ml-" in cluster.new_cluster.spark_version and "gpu" not in cluster.new_cluster.spark_version
    args = score_parser().parse_args(task.spark_python_task.parameters)
    (model,) = resources["registered_models"].values()
    registered = f"{model['catalog_name']}.{model['schema_name']}.{model['name']}"
    assert args.model_uri == f"models:/{registered}@champion"  # a Unity Catalog model, by alias
    assert args.images == ["/Volumes/main/cxr/incoming"] and args.table == "main.cxr.image_scores"
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    assert args.engine == "auto" and resolve_engine(args.engine, args.table) == "delta-spark"
    assert resolve_engine("auto", "/Volumes/main/cxr/processed/scores") == "delta-spark"  # a volume path too
    assert resolve_model_uri("models:/main.cxr.m/7") == "models:/main.cxr.m/7"  # a fixed version stays as given
    (weekly,) = jobs["cxr_train_weekly"].tasks  # the versions the alias moves between come from weekly training
    weekly_args = weekly.spark_python_task.parameters
    train = parse_args(train_parser(), "train", weekly_args[weekly_args.index("--") + 1:])
    assert train.register_model == registered


def break_unknown_field(root: Path) -> None:
    path = root / "jobs" / "cxr_jobs.yml"
    text = path.read_text().replace("max_concurrent_runs: 1", "max_concurrent_runs: 1\n      retries_forever: true", 1)
    path.write_text(text)


def break_missing_path(root: Path) -> None:
    (root / "etl" / "uncertainty.py").unlink()


def break_cluster_mode(root: Path) -> None:
    path = root / "jobs" / "cxr_jobs.yml"
    path.write_text(path.read_text().replace("            data_security_mode: SINGLE_USER\n", "", 1))


def break_wheel_location(root: Path) -> None:
    path = root / "databricks.yml"
    path.write_text(path.read_text().replace("-w dist .", "-w ../dist ."))
    shutil.rmtree(root / "dist")


@pytest.mark.parametrize("damage, expected", [
    (break_unknown_field, "Unexpected field 'retries_forever'"),
    (break_missing_path, "etl/uncertainty.py does not exist"),
    (break_cluster_mode, "data_security_mode None, not dedicated"),
    (break_wheel_location, "matches no built wheel"),
])
def test_a_broken_copy_of_the_bundle_is_caught(checkout, tmp_path, damage, expected):
    broken = tmp_path / "broken"
    shutil.copytree(checkout, broken)
    damage(broken)
    if (broken / "dist").exists():
        shutil.rmtree(broken / "dist")
    build_artifacts(broken, load_bundle(broken)[0])
    found = problems(broken)
    assert any(expected in problem for problem in found), found


def test_the_training_processes_write_no_table_and_the_driver_publishes(tmp_path):
    """Review point 1: train.py under TorchDistributor keeps its rows in RUN_DIR/auroc_rows.parquet (no delta-rs
    on a FUSE volume, no deltalake on the cluster); the driver writes them through Spark. delta-rs refuses a
    catalog name, saying what to use."""
    from cxr_pipeline.jobs.train_distributor import driver_owned_run
    from cxr_pipeline.training.evaluation.results import is_table_name, write_results

    args, run_dir, run_id, table = driver_owned_run(["--dataset", "d", "--output-dir", str(tmp_path / "runs")])
    assert table == "outputs/results_delta"  # train.py's default, which the driver writes instead
    assert run_dir == tmp_path / "runs" / run_id
    assert args[-4:] == ["--run-id", run_id, "--results-table", "none"]
    kept, _, same, _ = driver_owned_run(["--output-dir", str(tmp_path), "--run-id", "nightly-7"])
    assert same == "nightly-7" and kept.count("--run-id") == 1
    assert is_table_name("main.cxr.auroc_results") and is_table_name("cxr.auroc")
    assert not is_table_name("/Volumes/main/cxr/results") and not is_table_name("outputs/results_delta")
    with pytest.raises(ValueError, match="--results-engine delta-spark"):
        write_results("main.cxr.auroc_results", [{"run_id": "r", "label": "mean"}], "deltalake")
    cluster_requirements = (ROOT / "jobs" / "cluster-requirements.txt").read_text()
    assert "deltalake" not in cluster_requirements  # nothing on a cluster writes with delta-rs

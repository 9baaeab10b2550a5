"""The Databricks bundle as `databricks bundle validate/deploy` reads it: every target resolved,
each job loaded with databricks-bundles' resource classes (they refuse unknown fields), the
wheel built exactly as the bundle's `artifacts` section says from a clean checkout, and every
path it names present there. A deliberately broken copy must fail each check."""
import glob
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from databricks.bundles.jobs import Job

from conftest import ROOT

DEDICATED = {"SINGLE_USER", "DATA_SECURITY_MODE_DEDICATED"}
RUNTIME_REFERENCE = re.compile(r"\{\{[\w.]+\}\}")  # filled in by the Jobs service at run time, e.g. {{job.run_id}}
PROD_VARIABLES = {"service_principal": "00000000-0000-0000-0000-000000000000"}


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
            for name, job in part.get("resources", {}).get("jobs", {}).items():
                bundle.setdefault("resources", {}).setdefault("jobs", {})[name] = job
                defined_in[name] = path.parent
    return bundle, defined_in


def resolve(node, values: dict):
    """${var.x}, ${bundle.name}, ${bundle.target} substituted everywhere; unknown ones fail."""
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


def target_view(bundle: dict, target: str) -> tuple[dict, dict[str, Job]]:
    """(the target's settings, jobs by name) with the target's variables applied."""
    settings = bundle["targets"][target]
    variables = {name: spec.get("default") for name, spec in bundle["variables"].items()}
    variables.update(settings.get("variables", {}))
    if target == "prod":
        variables.update(PROD_VARIABLES)
    missing = [name for name, value in variables.items() if value is None]
    assert not missing, f"target {target}: variables without a value {missing}"
    values = {f"var.{name}": value for name, value in variables.items()}
    values.update({"bundle.name": bundle["bundle"]["name"], "bundle.target": target})
    resolved = resolve(bundle["resources"]["jobs"], values)
    return resolve(settings, values), {name: Job.from_dict(job) for name, job in resolved.items()}


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
                    if not glob.glob(str(folder / library.whl)):
                        found.append(f"{name}/{task.task_key}: {library.whl} matches no built wheel")
                    elif not (folder / library.whl).resolve().is_relative_to(root.resolve()):
                        found.append(f"{name}/{task.task_key}: {library.whl} lies outside the bundle root")
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
    assert prod_settings["workspace"]["root_path"].startswith("/Workspace/")
    assert prod_settings["run_as"]["service_principal_name"] == PROD_VARIABLES["service_principal"]
    assert prod_settings["permissions"] and prod_settings["mode"] == "production"
    # the AUROC rows go to a Unity Catalog table by name, not a folder in a volume
    table = bundle["variables"]["results_table"]["default"]
    assert re.fullmatch(r"\w+\.\w+\.\w+", table)
    for job in (prod["cxr_train_weekly"], prod["cxr_chexpert_selftrained"], prod["cxr_sweep"]):
        for task in job.tasks:
            parameters = task.spark_python_task.parameters
            if task.spark_python_task.python_file.endswith("train_distributor.py"):
                assert parameters[parameters.index("--results-table") + 1] == table
                assert parameters.index("--results-table") < parameters.index("--")  # the driver publishes


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
    from cxr_pipeline.jobs.train_distributor import with_run_folder_table
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
        train_args, staging, run_id = with_run_folder_table(args[args.index("--") + 1:])
        train = parse_args(train_parser(), "train", train_args)
        assert (train.dataset, train.model, train.stages) == (cell.dataset, cell.model, compare.stages)
        assert (run_id, train.output_dir) == (cell.run_id, str(cell.run_dir.parent))
        assert staging == str(cell.run_dir / sweep.RUN_TABLE)  # where compare reads the rows
        assert cell.run_id == "{{job.run_id}}-" + f"{cell.model}-{cell.size}"


def test_scoring_job_scores_new_images_nightly_with_the_registered_model_into_a_catalog_table():
    """cxr_score_nightly: jobs/score.py on an ML runtime (torch and mlflow ship with it), its parameters parsed by
    the job's own argparse: a registry alias it resolves to a fixed version, the incoming folder, and a Unity
    Catalog table written through Delta on Spark (the deltalake engine refuses catalog names)."""
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.jobs.score import build_parser as score_parser
    from cxr_pipeline.jobs.score import resolve_model_uri
    from cxr_pipeline.training.train import build_parser as train_parser

    bundle = load_bundle(ROOT)[0]
    _, jobs = target_view(bundle, "prod")
    job = jobs["cxr_score_nightly"]
    (task,) = job.tasks
    assert task.spark_python_task.python_file.endswith("jobs/score.py") and not task.depends_on
    assert re.fullmatch(r"0 \d+ \d+ \* \* \?", job.schedule.quartz_cron_expression)  # every day
    (cluster,) = job.job_clusters
    assert "-ml-" in cluster.new_cluster.spark_version and "gpu" not in cluster.new_cluster.spark_version
    args = score_parser().parse_args(task.spark_python_task.parameters)
    variables = {name: spec["default"] for name, spec in bundle["variables"].items()}
    assert args.model_uri == f"models:/{variables['registered_model']}@{variables['model_alias']}"
    assert re.fullmatch(r"models:/\w+\.\w+\.\w+@\w+", args.model_uri)  # a Unity Catalog model, by alias
    assert args.images == [variables["incoming_root"]] and args.table == variables["scores_table"]
    assert re.fullmatch(r"\w+\.\w+\.\w+", args.table) and args.engine == "delta-spark"
    assert resolve_model_uri("models:/main.cxr.m/7") == "models:/main.cxr.m/7"  # a fixed version stays as given
    (weekly,) = jobs["cxr_train_weekly"].tasks  # the versions the alias moves between come from weekly training
    weekly_args = weekly.spark_python_task.parameters
    train = parse_args(train_parser(), "train", weekly_args[weekly_args.index("--") + 1:])
    assert train.register_model == variables["registered_model"]


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


def test_a_catalog_table_is_written_by_the_driver_from_the_run_folder(tmp_path):
    """train.py never needs Spark: given a Unity Catalog name, the job entry point sends its rows
    to RUN_DIR/results_delta (with a run id fixed in advance) and appends them from the driver."""
    from cxr_pipeline.jobs.train_distributor import with_run_folder_table
    from cxr_pipeline.training.results import append_results, is_table_name

    args, staging, run_id = with_run_folder_table(["--dataset", "d", "--output-dir", str(tmp_path / "runs")])
    assert staging == str(tmp_path / "runs" / run_id / "results_delta")
    assert args[-4:] == ["--run-id", run_id, "--results-table", staging]
    kept, _, same = with_run_folder_table(["--output-dir", str(tmp_path), "--run-id", "nightly-7"])
    assert same == "nightly-7" and kept.count("--run-id") == 1
    assert is_table_name("main.cxr.auroc_results") and is_table_name("cxr.auroc")
    assert not is_table_name("/Volumes/main/cxr/results") and not is_table_name("outputs/results_delta")
    with pytest.raises(ValueError, match="--results-engine delta-spark"):
        append_results("main.cxr.auroc_results", [{"run_id": "r", "label": "mean"}])

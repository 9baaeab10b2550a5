"""Deployment files, validated structurally (no Docker engine or Databricks workspace here)."""
import re
from pathlib import Path

import pytest
import yaml
from databricks.sdk.service.jobs import JobSettings

from conftest import ROOT

SECRET_WORDS = re.compile(r"token|password|secret|apikey|api_key|dapi[0-9a-f]{8}", re.IGNORECASE)


def resolve_variables(node, variables):
    if isinstance(node, dict):
        return {key: resolve_variables(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_variables(value, variables) for value in node]
    if isinstance(node, str):
        return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]), node)
    return node


@pytest.fixture(scope="module")
def bundle():
    return yaml.safe_load((ROOT / "jobs" / "databricks.yml").read_text())


@pytest.fixture(scope="module")
def jobs(bundle):
    variables = {name: spec["default"] for name, spec in bundle["variables"].items()}
    resolved = resolve_variables(bundle["resources"]["jobs"], variables)
    return {name: JobSettings.from_dict(settings) for name, settings in resolved.items()}


def test_bundle_defines_a_nightly_etl_and_a_weekly_training_job(jobs):
    assert set(jobs) == {"cxr_etl_nightly", "cxr_train_weekly", "cxr_chexpert_selftrained"}
    nightly, weekly = jobs["cxr_etl_nightly"].schedule, jobs["cxr_train_weekly"].schedule
    assert nightly.quartz_cron_expression.split()[3:5] == ["*", "*"]  # every day of every month
    assert weekly.quartz_cron_expression.split()[5] in {"SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"}
    for settings in jobs.values():
        assert settings.schedule.timezone_id and len(settings.schedule.quartz_cron_expression.split()) in (6, 7)
        assert settings.email_notifications.on_failure
        assert settings.job_clusters and settings.max_concurrent_runs == 1


def test_every_task_runs_a_file_of_this_repository_with_retries_and_the_wheel(jobs):
    for settings in jobs.values():
        for task in settings.tasks:
            entry = (ROOT / "jobs" / task.spark_python_task.python_file).resolve()
            assert entry.is_file() and entry.is_relative_to(ROOT), entry
            assert task.max_retries >= 1 and task.timeout_seconds > 0
            assert task.job_cluster_key in {c.job_cluster_key for c in settings.job_clusters}
            assert any(library.whl for library in task.libraries)


def test_training_task_uses_torch_distributor_and_etl_task_is_parameterised(jobs):
    (train,) = jobs["cxr_train_weekly"].tasks
    assert train.spark_python_task.python_file.endswith("jobs/train_distributor.py")
    assert "--use-gpu" in train.spark_python_task.parameters
    (etl,) = jobs["cxr_etl_nightly"].tasks
    parameters = etl.spark_python_task.parameters
    assert parameters[parameters.index("--source") + 1] == "nih" and parameters[parameters.index("--size") + 1] == "224"


def test_self_trained_job_chains_first_pass_relabel_second_pass_on_the_same_files(jobs):
    settings = jobs["cxr_chexpert_selftrained"]
    first, relabel, second = settings.tasks
    assert settings.schedule.pause_status.value == "PAUSED"  # on demand
    assert [d.task_key for d in relabel.depends_on] == ["first_pass"]
    assert [d.task_key for d in second.depends_on] == ["relabel"]
    first_args, relabel_args, second_args = (t.spark_python_task.parameters for t in (first, relabel, second))
    assert "--predict-train" in first_args and relabel.spark_python_task.python_file.endswith("etl/uncertainty.py")
    run_dir = f"{first_args[first_args.index('--output-dir') + 1]}/{first_args[first_args.index('--run-id') + 1]}"
    assert relabel_args[relabel_args.index("--predictions") + 1] == f"{run_dir}/predictions_finetune_train.csv"
    assert relabel_args[relabel_args.index("--dataset") + 1] == first_args[first_args.index("--dataset") + 1]
    assert second_args[second_args.index("--dataset") + 1] == relabel_args[relabel_args.index("--output") + 1]


def strings(node):
    """Every key and value of a parsed YAML document (comments are not configuration)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif node is not None:
        yield str(node)


@pytest.mark.parametrize("path", ["jobs/databricks.yml", "docker-compose.yml"])
def test_no_secret_or_workspace_host_in_deployment_files(path):
    for text in strings(yaml.safe_load((ROOT / path).read_text())):
        assert not SECRET_WORDS.search(text), f"{path}: {text}"
        assert not re.search(r"[\w.-]+\.(cloud\.databricks\.com|azuredatabricks\.net)", text), f"{path}: {text}"
    dockerfile = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    assert not any(SECRET_WORDS.search(line) for line in dockerfile)


def test_docker_compose_services_ports_volumes_and_commands():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"spark-master", "spark-worker", "trainer"} <= set(services)
    for name, service in services.items():
        assert service.get("build") == "." and service.get("image"), name
        assert (ROOT / "Dockerfile").is_file()
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name} publishes {mapping} beyond loopback"
        targets = {re.search(r":(/[^:]+)(:r[ow])?$", volume).group(1) for volume in service["volumes"]}
        assert {"/data", "/outputs"} <= targets, name
    assert services["spark-master"]["command"][:2] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    worker = services["spark-worker"]
    assert worker["command"][1] == "org.apache.spark.deploy.worker.Worker"
    assert worker["command"][2] == "spark://spark-master:7077" and "spark-master" in worker["depends_on"]
    make_target = services["trainer"]["command"][1]
    assert re.search(rf"^{make_target}:", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_dockerfile_installs_through_the_project_install_script():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "install/setup_env.sh" in dockerfile and "openjdk-17" in dockerfile
    assert Path(ROOT / "install" / "setup_env.sh").is_file()

"""Deployment files: secrets, docker-compose and the Dockerfile (the bundle: test_bundle.py)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SECRET_WORDS = re.compile(r"token|password|secret|apikey|api_key|dapi[0-9a-f]{8}", re.IGNORECASE)
# A value taken from a Databricks secret scope when the cluster starts: the secret itself is in no file.
SECRET_REFERENCE = re.compile(r"\{\{secrets/[\w${}.-]+/[\w${}.-]+\}\}")


def strings(node):
    """Every key and value of a parsed YAML document (comments are not configuration), except a key whose value
    is only a secret-scope reference."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and SECRET_REFERENCE.fullmatch(value):
                continue
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif node is not None:
        yield str(node)


@pytest.mark.parametrize("path", ["databricks.yml", "jobs/cxr_jobs.yml", "docker-compose.yml"])
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
    assert worker["command"][2] == "spark://spark-master:7077"
    make_target = services["trainer"]["command"][1]
    assert re.search(rf"^{make_target}:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert "outputs" in compose["volumes"]  # a named volume, not a folder of the checkout


def test_compose_services_advertise_their_own_hostname_and_wait_for_healthy_dependencies():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        # Spark binds and advertises SPARK_LOCAL_IP: 0.0.0.0 cannot be reached from another container
        assert service["hostname"] == name and service["environment"]["SPARK_LOCAL_IP"] == name, name
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert services[dependency]["healthcheck"]["test"], dependency
    assert set(services["trainer"]["depends_on"]) == {"spark-master", "spark-worker"}
    assert set(services["spark-worker"]["depends_on"]) == {"spark-master"}


@pytest.mark.skipif(shutil.which("docker-compose") is None and subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0 if shutil.which("docker") else True,
                    reason="no docker compose client here (docker compose plugin or docker-compose)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, env={**os.environ, "DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "condition: service_healthy" in result.stdout and "hostname: spark-worker" in result.stdout


def test_dockerfile_caches_the_dependency_layer_across_code_changes():
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    assert any("openjdk-17" in line for line in lines)
    install = next(i for i, line in enumerate(lines) if "install/setup_env.sh" in line)
    copy_all = next(i for i, line in enumerate(lines) if line.startswith("COPY . "))
    copies_before = [line for line in lines[:install] if line.startswith("COPY")]
    assert install < copy_all and copies_before, "dependencies must be installed before the source is copied"
    # what the install script hashes and reads must be in the layers before it
    assert {"install/", "setup.py"} <= {line.split()[1] for line in copies_before}
    assert Path(ROOT / "install" / "setup_env.sh").is_file()

"""Deployment files: secrets, docker-compose and the Dockerfile (the bundle: test_bundle.py)."""
import os
import re
import shlex
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


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def volume_target(service: dict, source: str) -> str:
    """Where a service mounts `source` (a named volume or a host path)."""
    mounts = [re.fullmatch(r"(.+):(/[^:]+)(:r[ow])?", volume).groups()[:2] for volume in service["volumes"]]
    targets = [target for name, target in mounts if name == source]
    assert len(targets) == 1, (source, service["volumes"])
    return targets[0]


def trainer_commands() -> list[list[str]]:
    """The trainer's default command as its shell would run it: `make -n TARGET` in the trainer's environment
    prints the recipe with the Makefile's variables expanded; one word list per simple command."""
    trainer = compose_services()["trainer"]
    assert trainer["command"][0] == "make", trainer["command"]
    env = {**os.environ, **{key: str(value) for key, value in trainer["environment"].items()}}
    result = subprocess.run(["make", "-n", "--no-print-directory", *trainer["command"][1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    commands = []
    for line in lines:
        words = []
        for word in line + [";"]:
            if word in {"||", "&&", ";", "|"}:
                if words:
                    commands.append(words[1:] if words[0] == "time" else words)
                words = []
            else:
                words.append(word)
    return commands


def flag(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def spark_confs(words: list[str]) -> dict[str, str]:
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words[:-1]) if word == "--conf")


def size_in_mb(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([kmgt]?)b?", text.lower()).groups()
    return int(number) * {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 ** 2}[unit]


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
    services = compose_services()
    for name, service in services.items():
        # Spark binds and advertises SPARK_LOCAL_IP: 0.0.0.0 cannot be reached from another container
        assert service["hostname"] == name and service["environment"]["SPARK_LOCAL_IP"] == name, name
        # a driver advertises SPARK_LOCAL_HOSTNAME when it is set (spark.driver.host's default)
        assert service["environment"].get("SPARK_LOCAL_HOSTNAME", name) == name, name
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert services[dependency]["healthcheck"]["test"], dependency
    assert set(services["trainer"]["depends_on"]) == {"spark-master", "spark-worker"}
    assert set(services["spark-worker"]["depends_on"]) == {"spark-master"}


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_compose_trainer_runs_the_etl_on_the_compose_master_with_executors_on_the_worker():
    services = compose_services()
    commands = trainer_commands()
    assert not [words for words in commands if any("local[" in word for word in words)], commands
    submits = [words for words in commands if words[0] == "spark-submit"]
    assert submits and all(any(word.endswith("etl/preprocess.py") for word in words) for words in submits), commands
    master = services["spark-master"]["command"]
    master_url = f"spark://{services['spark-master']['hostname']}:{master[master.index('--port') + 1]}"
    worker = services["spark-worker"]["command"]
    worker_cores, worker_memory = int(worker[worker.index("--cores") + 1]), worker[worker.index("--memory") + 1]
    for words in submits:
        assert flag(words, "--master") == master_url, words
        confs = spark_confs(words)
        # the executors on spark-worker connect back to the driver at the address it advertises
        assert confs.get("spark.driver.host") == services["trainer"]["hostname"], words
        assert confs.get("spark.driver.bindAddress", confs["spark.driver.host"]) == services["trainer"]["hostname"]
        # an executor the worker cannot hold would leave the job waiting for resources forever
        assert int(confs.get("spark.executor.cores", worker_cores)) <= worker_cores, words
        assert size_in_mb(confs.get("spark.executor.memory", "1g")) <= size_in_mb(worker_memory), words
    assert any(words[0] == "horovodrun" and any(word.endswith("training/train.py") for word in words)
               for words in commands), commands


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_compose_trainer_writes_only_under_the_outputs_volume_the_worker_shares():
    services = compose_services()
    outputs = volume_target(services["trainer"], "outputs")
    # the executors read the images and write the dataset's files, the driver lists and renames them: the
    # worker and the trainer must mount the same volumes at the same paths
    assert volume_target(services["spark-worker"], "outputs") == outputs
    assert sorted(services["spark-worker"]["volumes"]) == sorted(services["trainer"]["volumes"])
    for volume in services["trainer"]["volumes"]:  # with the variables unset: no bind of a checkout folder
        assert not re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).startswith("."), volume
    required = {"etl/preprocess.py": ["--data-root", "--output"],
                "training/train.py": ["--dataset", "--output-dir", "--results-table"],
                "etl.demo_data": ["--output"], "training.show_results": ["--table"]}
    seen = set()
    for words in trainer_commands():
        for program, flags in required.items():
            if any(word == program or word.endswith("/" + program) for word in words):
                seen.add(program)
                for name in flags:  # the configs' own paths (conf/demo.yaml) are relative to the image's folder
                    assert (flag(words, name) or "").startswith(outputs + "/"), (name, words)
        for i, word in enumerate(words[:-1]):
            if word in {"--output", "--output-dir", "--results-table", "--table", "--dataset", "--data-root"}:
                assert words[i + 1].startswith(outputs + "/"), words
    assert seen == set(required), seen


def test_dockerfile_sets_no_architecture_specific_java_home():
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    environment = [f"{key}={value}" for service in compose_services().values()
                   for key, value in service.get("environment", {}).items()]
    architectures = re.compile(r"amd64|x86[_-]64|arm64|aarch64|armhf|armel|i386|i686|ppc64|s390x|riscv64")
    for line in lines + environment:
        if "JAVA_HOME" in line:
            assert not architectures.search(line), line
    # the executors' Python: the venv the image installs, by the same path on every service
    assert "PYSPARK_PYTHON=/opt/venv/bin/python" in "\n".join(lines)
    assert any("VENV=/opt/venv" in line and "install/setup_env.sh" in line for line in lines)


@pytest.mark.skipif(shutil.which("docker-compose") is None and subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0 if shutil.which("docker") else True,
                    reason="no docker compose client here (docker compose plugin or docker-compose)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, env={**os.environ, "DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "condition: service_healthy" in result.stdout and "hostname: spark-worker" in result.stdout
    assert "compose-demo" in result.stdout


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

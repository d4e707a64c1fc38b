"""The production deployment files: docker-compose.yml, Dockerfile and .dockerignore.

No container runs here: these tests read the files and check that they hang together (one image
and one configuration for every tunepool service, the start order, the GPU reservation, shared
artifact storage, health checks) and that every command they run is a real `tunepool` command.
Where a Docker Compose client is installed, `config -q` validates the file as Compose reads it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "flower"}
TUNEPOOL_SERVICES = ("migrate", "api", "worker")  # run `tunepool ...` in the tunepool image
LONG_RUNNING = ("postgres", "redis", "api", "worker", "flower")  # migrate runs once and exits


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, from either of Compose's two spellings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts_of(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((entry["source"], entry["target"], bool(entry.get("read_only"))))
        elif ":" not in entry:  # an anonymous volume: TARGET
            mounts.append(("", entry, False))
        elif entry.rsplit(":", 1)[1].startswith("/"):  # SOURCE:TARGET (SOURCE may hold a ${A:-b})
            source, target = entry.rsplit(":", 1)
            mounts.append((source, target, False))
        else:  # SOURCE:TARGET:MODE
            source, target, mode = entry.rsplit(":", 2)
            mounts.append((source, target, "ro" in mode.split(",")))
    return mounts


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def test_the_six_services_exist(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= SERVICES


def test_tunepool_services_share_one_image_and_one_configuration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = services["api"]
    assert api.get("image") and api.get("build"), "api: needs both an image name and how to build it"
    for name in (*TUNEPOOL_SERVICES, "flower"):
        service = services[name]
        assert service.get("image") == api["image"], name
        assert service.get("build") == api["build"], name
        assert env_of(service) == env_of(api), name
        assert "entrypoint" not in service or name == "flower", f"{name}: runs the image's `tunepool`"

    env = env_of(api)
    database = urlsplit(env["TUNEPOOL_DATABASE_URL"])
    postgres = services["postgres"]
    pg_env = env_of(postgres)
    assert database.scheme == "postgresql+psycopg"
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.username == pg_env["POSTGRES_USER"]
    assert database.password == pg_env["POSTGRES_PASSWORD"]
    assert database.path == "/" + pg_env["POSTGRES_DB"]
    assert postgres["image"].split(":")[0] == "postgres"

    broker = urlsplit(env["TUNEPOOL_BROKER_URL"])
    assert broker.scheme == "redis"
    assert (broker.hostname, broker.port or 6379) == ("redis", 6379)
    assert services["redis"]["image"].split(":")[0] == "redis"

    assert env["TUNEPOOL_STORAGE_DIR"] == "/data/artifacts"


def test_compose_settings_are_tunepool_settings(compose: dict[str, Any]) -> None:
    """Every TUNEPOOL_ variable the file sets is a real setting that accepts its value."""
    from service.settings import Settings, load_settings

    env = env_of(compose["services"]["api"])
    names = {name.removeprefix("TUNEPOOL_").lower() for name in env}
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
    settings = load_settings(**{name.removeprefix("TUNEPOOL_").lower(): v for name, v in env.items()})
    assert not settings.is_sqlite
    assert str(settings.artifacts) == env["TUNEPOOL_STORAGE_DIR"]


def test_worker_owns_the_nvidia_gpus_it_reserves(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (device,) = devices
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # one GPU by count or by id (Compose refuses both at once), and the worker owns exactly the
    # GPUs the container sees: indices 0..count-1 whichever GPUs of the host they are
    assert (device.get("count") == 1) != (len(device.get("device_ids") or []) == 1)
    command = command_of(worker)
    assert command[command.index("--gpus") + 1] == "0"


def test_api_and_workers_share_the_artifact_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = set(compose.get("volumes") or {})
    artifact_mounts = set()
    for name in TUNEPOOL_SERVICES:
        storage_dir = env_of(services[name])["TUNEPOOL_STORAGE_DIR"]
        mounts = [(src, ro) for src, target, ro in mounts_of(services[name]) if target == storage_dir]
        assert len(mounts) == 1, f"{name}: nothing (or several things) mounted at {storage_dir}"
        ((source, read_only),) = mounts
        assert not read_only, name
        assert source in named_volumes, f"{name}: {source} is not a named volume"
        artifact_mounts.add(source)
    assert len(artifact_mounts) == 1, artifact_mounts

    # base model files, read-only, where the worker loads them from
    models = [(src, ro) for src, target, ro in mounts_of(services["worker"]) if target == "/models"]
    assert len(models) == 1 and models[0][1], models


def test_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"  # one-shot: exits 0 and stays down
    for name in ("api", "worker"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        assert depends_on["redis"]["condition"] == "service_healthy", name
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        assert services[name].get("restart") in ("unless-stopped", "always"), name


def test_long_running_services_have_a_healthcheck_or_say_why_not(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        service = services[name]
        healthcheck = service.get("healthcheck")
        if healthcheck is None:
            reason = service.get("x-no-healthcheck", "")
            assert len(reason.split()) >= 10, f"{name}: no healthcheck and no x-no-healthcheck reason"
            continue
        assert not healthcheck.get("disable"), name
        test = healthcheck["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "worker" in services and "healthcheck" not in services["worker"]

    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "http://localhost:8000/readyz" in api_check
    assert services["api"]["healthcheck"]["test"][1] == "python"  # no curl in python:3.11-slim
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_readyz_is_a_route_of_the_api() -> None:
    from service.api.health import router

    assert {"/healthz", "/readyz"} <= {getattr(route, "path", None) for route in router.routes}


@pytest.mark.parametrize("service_name", TUNEPOOL_SERVICES)
def test_commands_are_real_tunepool_commands(compose: dict[str, Any], service_name: str) -> None:
    command = command_of(compose["services"][service_name])
    subcommand, args = command[0], command[1:]

    # the subcommand exists: `python -m service.cli SUBCOMMAND --help` succeeds
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", subcommand, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, f"`tunepool {subcommand} --help`: {result.stdout}{result.stderr}"
    assert "Usage" in result.stdout

    # and its options and values parse as the compose file gives them (nothing is run)
    from service.cli import app

    group: Any = typer.main.get_command(app)
    context = group.make_context("tunepool", list(command))
    name, cli_command, rest = group.resolve_command(context, list(command))
    assert name == subcommand and rest == args
    # raises on an unknown option, a bad value or an extra argument
    cli_command.make_context(name, list(rest), parent=context)


def test_flower_runs_from_the_image_with_the_shared_broker(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    script = " ".join(command_of(flower))
    assert flower["entrypoint"] == ["sh", "-c"]
    assert "celery" in script and "flower" in script and "--port=5555" in script
    # `$$` is Compose's escape: the container's shell expands the variable from the environment
    # (a plain `${...}` would be filled in from the host's environment, where it is not set).
    assert '--broker="$$TUNEPOOL_BROKER_URL"' in script
    assert any(str(port).endswith("5555:5555") for port in flower["ports"])
    assert "localhost:5555/healthcheck" in " ".join(flower["healthcheck"]["test"])

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("flower") for dep in project["optional-dependencies"]["prod"])


def test_no_command_takes_variables_from_the_host(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key in ("command", "entrypoint"):
            text = json.dumps(service.get(key, ""))
            assert "${TUNEPOOL_" not in text and "$TUNEPOOL_" not in text.replace("$$", ""), (name, key)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def with_arg_defaults(text: str, instructions: list[tuple[str, str]]) -> str:
    """`text` with each ${NAME} of an `ARG NAME=default` replaced by its default."""
    for word, args in instructions:
        if word == "ARG" and "=" in args:
            name, default = args.split("=", 1)
            text = text.replace("${" + name + "}", default)
    return text


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    instructions = dockerfile_instructions()
    runs = [(i, args) for i, (word, args) in enumerate(instructions) if word == "RUN"]
    torch = [
        i
        for i, args in runs
        if "pip install" in args and '"torch==2.13.0"' in with_arg_defaults(args, instructions)
    ]
    project = [i for i, args in runs if "pip install" in args and '".[prod]"' in args]
    assert len(torch) == 1 and len(project) == 1, (torch, project)
    assert torch[0] < project[0]
    assert '--index-url "${TORCH_INDEX_URL}"' in instructions[torch[0]][1]

    args = {args.split("=")[0] for word, args in instructions if word == "ARG"}
    assert {"TORCH_INDEX_URL", "TORCH_VERSION"} <= args

    # the source is copied after the dependencies are installed, so a code edit keeps their layer
    first_source_copy = min(
        i for i, (word, args) in enumerate(instructions) if word == "COPY" and args.startswith("service")
    )
    assert torch[0] < first_source_copy < project[0]


def test_dockerfile_runtime() -> None:
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert "PYTHON_IMAGE=python:3.11-slim" in [args for word, args in instructions if word == "ARG"]
    assert all(image.startswith("${PYTHON_IMAGE}") for image in froms)

    # the instructions of the last stage are what the image runs with
    last_stage = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    final = {word: args for word, args in last_stage}  # the last of each kind wins, as in Docker
    assert json.loads(final["ENTRYPOINT"]) == ["tunepool"]
    assert final["WORKDIR"] == "/app"
    assert final["USER"] not in ("root", "0")
    env = " ".join(args for word, args in last_stage if word == "ENV")
    assert "TUNEPOOL_STORAGE_DIR=/data/artifacts" in env


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    wanted = {".venv", ".tunepool", "runs", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    assert wanted <= entries, wanted - entries
    assert "__pycache__" in entries or "**/__pycache__" in entries

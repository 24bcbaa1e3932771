"""docker-compose.yml and the committed JSON Schemas stay valid and in step with the code."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from schemas import export
from tests.conftest import ROOT


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_passes() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    result = subprocess.run([*command, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_configures_services_with_the_same_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "milvus", "etcd", "minio", "api"} <= set(services)
    env = services["api"]["environment"]
    assert env["RECSYS_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["RECSYS_MILVUS__URI"].startswith("http://milvus:")


def test_committed_json_schemas_are_current() -> None:
    wanted = export.render()
    on_disk = {p.name: p.read_text() for p in export.OUT_DIR.glob("*.json")}
    stale = sorted(name for name in wanted.keys() | on_disk.keys() if wanted.get(name) != on_disk.get(name))
    assert not stale, f"stale JSON schemas (run python -m schemas.export): {stale}"


def test_env_example_lists_every_setting() -> None:
    from serving.config import env_example

    assert (ROOT / ".env.example").read_text() == env_example(), "stale .env.example (python -m serving.config > .env.example)"

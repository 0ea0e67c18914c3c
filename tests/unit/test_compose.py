"""docker-compose.yaml and the Dockerfile, checked without docker (it cannot run here): they parse, reference only
files that exist, and every service runs a process of the launch plan of its config."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from launch.plan import launch_plan
from ppd.config import REPO_ROOT, load_config

COMPOSE = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value):
    """Compose's `${VAR:-default}` with no VAR set, recursively."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def services() -> dict:
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()))
    return doc["services"]


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_services_and_profiles(services):
    assert set(services) == {"prefill", "decode", "router", "embedded"}
    assert {name: s["profiles"] for name, s in services.items()} == {
        "prefill": ["gpu"],
        "decode": ["gpu"],
        "router": ["gpu"],
        "embedded": ["cpu"],
    }


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_gpu_servers_get_gpus_shared_memory_and_host_network(services, name):
    s = services[name]
    assert s["network_mode"] == "host" and s["ipc"] == "host" and s["shm_size"]
    (device,) = s["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # the plan's CUDA_VISIBLE_DEVICES must name GPUs the container can see
    cfg_path = _flag(s["command"], "--config")
    cfg = load_config(REPO_ROOT / cfg_path)
    spec = {p.name: p for p in launch_plan(cfg, REPO_ROOT / cfg_path)}[_flag(s["command"], "--only")]
    visible = set(device["device_ids"])
    assert set(spec.env["CUDA_VISIBLE_DEVICES"].split(",")) <= visible


def test_every_command_is_a_process_of_its_launch_plan(services):
    for name, s in services.items():
        for argv in (s["command"], s["healthcheck"]["test"][1:]):
            assert argv[:2] == ["ppd", "launch"], name
            cfg_path = REPO_ROOT / _flag(argv, "--config")
            assert cfg_path.is_file(), f"{name}: {cfg_path} missing"
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            plan = {p.name for p in launch_plan(load_config(cfg_path, sets), cfg_path, sets)}
            for flag in ("--only", "--check"):
                if flag in argv:
                    assert _flag(argv, flag) in plan, f"{name}: {flag} {_flag(argv, flag)} not in {plan}"


def test_router_waits_for_healthy_backends(services):
    assert services["router"]["depends_on"] == {
        "prefill": {"condition": "service_healthy"},
        "decode": {"condition": "service_healthy"},
    }
    assert "router.host=0.0.0.0" in services["embedded"]["command"]  # reachable through the published port
    assert services["embedded"]["ports"] == ["8000:8000"]


def test_referenced_files_exist(services):
    for name, s in services.items():
        build = s.get("build")
        if build:
            assert (REPO_ROOT / build["context"]).is_dir(), name
            assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in s.get("volumes", []):
            host = volume.split(":", 1)[0]
            assert (REPO_ROOT / host).exists(), f"{name}: volume source {host} missing"


def test_dockerfile_runs_the_install_script_and_a_real_config():
    text = DOCKERFILE.read_text()
    assert "bash scripts/install.sh" in text and (REPO_ROOT / "scripts" / "install.sh").is_file()
    for line in text.splitlines():
        if line.startswith("COPY "):
            src = shlex.split(line)[1]
            assert (REPO_ROOT / src).exists(), line
        if line.startswith("CMD "):
            argv = yaml.safe_load(line[4:])  # JSON form
            assert (REPO_ROOT / _flag(argv, "--config")).is_file()

"""docker-compose.yml stays valid and keeps its promises, checked with the real compose CLI
(`docker-compose config` resolves and validates the file without an engine). The stack
itself is brought up and run by tests/test_compose_stack.py (make test-containers)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"LABEL_STUDIO_TOKEN": "0" * 40, "POSTGRES_PASSWORD": "pg-secret",
           "LABEL_STUDIO_SECRET_KEY": "django-secret", "LABEL_STUDIO_PASSWORD": "ls-secret",
           "VISIONLOOP_BACKEND_SECRET": "backend-secret-0123456789"}
REQUIRED = {**SECRETS, "DATA_DIR": "/srv/images"}


def compose_config(env: dict[str, str], *files: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make setup` installs it (Debian package)"
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    flags = [arg for f in files for arg in ("-f", f)]
    return subprocess.run([binary, *flags, "config"], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def port_mapping(port: str | dict) -> tuple[str, int]:
    """(host ip, container port) from compose v1's "ip:host:target/tcp" or v2's mapping."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), int(port["target"])
    parts = port.split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else ""), int(parts[-1])


def test_compose_file_resolves_with_secrets_and_refuses_without():
    missing = compose_config({})
    assert missing.returncode != 0 and "set " in missing.stderr

    result = compose_config(REQUIRED)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "labelstudio", "torchserve", "push", "retrain",
                             "ml-backend", "torchserve-b", "balancer"}
    # the second replica and its balancer only with --profile replicas
    assert {name for name, s in services.items() if s.get("profiles")} == {"torchserve-b",
                                                                            "balancer"}
    assert all(services[n]["profiles"] == ["replicas"] for n in ("torchserve-b", "balancer"))
    # each replica names itself as the retrain job reaches it (its in-flight markers)
    assert services["torchserve-b"]["environment"]["VISIONLOOP_REPLICA"] == "torchserve-b:8081"
    assert (services["ml-backend"]["environment"]["VISIONLOOP_BACKEND_SECRET"]
            == SECRETS["VISIONLOOP_BACKEND_SECRET"])
    # every image is built here: nothing is pulled from a registry
    assert all("build" in service for service in services.values())

    # TorchServe serves the registry's champion, so a restart serves the last promotion
    assert "--champion" in services["torchserve"]["command"]
    # every server has a healthcheck; TorchServe's asks for a READY worker, not /ping
    assert {n for n, s in services.items() if "healthcheck" in s} == {
        "postgres", "labelstudio", "torchserve", "torchserve-b", "ml-backend"}
    assert services["torchserve"]["healthcheck"]["test"][1:4] == ["visionloop", "serve", "ready"]

    # only loopback publishing, and never the management API
    published = [port_mapping(p) for s in services.values() for p in s.get("ports", [])]
    assert published and all(host_ip == "127.0.0.1" for host_ip, _ in published)
    assert all(target != 8081 for _, target in published)

    # Label Studio and the capture index on PostgreSQL
    labelstudio = services["labelstudio"]
    assert labelstudio["environment"]["DJANGO_DB"] == "default"
    assert all(services[s]["environment"]["VISIONLOOP_CAPTURE_DATABASE"].startswith(
        "postgresql://visionloop:pg-secret@postgres:5432/") for s in ("torchserve", "push"))

    # the stages share model_store and the capture store
    def mounts(name: str) -> set[str]:  # named volumes (v1 prints "name:/path[:ro]")
        return {v["source"] if isinstance(v, dict) else v.split(":")[0]
                for v in services[name]["volumes"]
                if (v.get("type") == "volume" if isinstance(v, dict) else not v.startswith("/"))}
    assert {"model_store", "captures"} <= mounts("torchserve") & mounts("retrain")
    assert "captures" in mounts("labelstudio") and "captures" in mounts("push")
    assert "--every" in services["retrain"]["command"] and "--every" in services["push"]["command"]

    # secrets come from the environment, never from the file
    text = (ROOT / "docker-compose.yml").read_text()
    assert all(value not in text for value in SECRETS.values())


def test_the_gpu_override_reserves_a_gpu_for_torchserve_and_the_retrain_job():
    result = compose_config(REQUIRED, "docker-compose.yml", "docker-compose.gpu.yml")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("torchserve", "retrain"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["push"]

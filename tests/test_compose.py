"""docker-compose.yml stays valid and keeps its promises, checked with the real compose CLI
(`docker-compose config` resolves and validates the file without a Docker engine)."""

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


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make setup` installs it (Debian package)"
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([binary, "config"], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def port_mapping(port: str | dict) -> tuple[str, int]:
    """(host ip, container port) from compose v1's "ip:host:target/tcp" or v2's mapping."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), int(port["target"])
    parts = port.split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else ""), int(parts[-1])


def test_compose_file_resolves_with_secrets_and_refuses_without():
    missing = compose_config({})
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr

    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "labelstudio", "torchserve", "retrain", "ml-backend"}
    assert (services["ml-backend"]["environment"]["VISIONLOOP_BACKEND_SECRET"]
            == SECRETS["VISIONLOOP_BACKEND_SECRET"])

    # TorchServe on the GPU with a readiness check that asks for a READY worker
    torchserve = services["torchserve"]
    (device,) = torchserve["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert torchserve["healthcheck"]["test"][1:4] == ["visionloop", "serve", "ready"]
    assert torchserve["build"]["args"]["ORT"] == "gpu"

    # only loopback publishing, and never the management API
    published = [port_mapping(p) for s in services.values() for p in s.get("ports", [])]
    assert published and all(host_ip == "127.0.0.1" for host_ip, _ in published)
    assert all(target != 8081 for _, target in published)

    # Label Studio on PostgreSQL, started only once the database is healthy
    labelstudio = services["labelstudio"]
    assert labelstudio["environment"]["DJANGO_DB"] == "default"
    assert labelstudio["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in labelstudio

    # the stages share model_store and the capture store
    def mounts(name: str) -> set[str]:  # named volumes (v1 prints "name:/path[:ro]")
        return {v["source"] if isinstance(v, dict) else v.split(":")[0]
                for v in services[name]["volumes"]
                if (v.get("type") == "volume" if isinstance(v, dict) else not v.startswith("/"))}
    assert {"model_store", "captures"} <= mounts("torchserve") & mounts("retrain")
    assert "captures" in mounts("labelstudio")
    assert services["retrain"]["depends_on"]["torchserve"]["condition"] == "service_healthy"
    assert "--every" in services["retrain"]["command"]

    # secrets come from the environment, never from the file
    text = (ROOT / "docker-compose.yml").read_text()
    assert all(value not in text for value in SECRETS.values())

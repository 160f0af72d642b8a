"""Building and running this repository's images with podman, for the container tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PODMAN = str(ROOT / "deploy" / "podman.sh")
BASE = "visionloop-base:bookworm"
VISIONLOOP_IMAGE = "visionloop:test"
# the service images compose names (docker-compose.yml), built from deploy/<folder>
SERVICE_IMAGES = {"visionloop-postgres:latest": "postgres",
                  "visionloop-labelstudio:latest": "labelstudio"}


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def build_visionloop_image(name: str = VISIONLOOP_IMAGE) -> str:
    """deploy/build-image.sh: the base if missing, the wheel, the image; its last line."""
    built = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), name, "cpu"],
                           capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return built.stdout.strip().splitlines()[-1]


def build_service_images() -> dict[str, float]:
    """PostgreSQL's and Label Studio's images on the local base; seconds per image."""
    seconds = {}
    for image, folder in SERVICE_IMAGES.items():
        started = time.monotonic()
        built = podman("build", "--pull=never", "--build-arg", f"BASE={BASE}", "--tag", image,
                       str(ROOT / "deploy" / folder), timeout=1800)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        seconds[image] = time.monotonic() - started
    return seconds

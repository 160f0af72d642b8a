"""Building and running this repository's images with podman, for the container tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PODMAN = str(ROOT / "deploy" / "podman.sh")
BASE = "visionloop-base:bookworm"
VISIONLOOP_IMAGE = "visionloop:test"
# the service images compose names (docker-compose.yml), built from deploy/<folder>
SERVICE_IMAGES = {"visionloop-postgres:latest": "postgres",
                  "visionloop-labelstudio:latest": "labelstudio",
                  "visionloop-haproxy:latest": "haproxy"}


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def build_visionloop_image(name: str = VISIONLOOP_IMAGE) -> str:
    """deploy/build-image.sh: the base if missing, the wheel, the image; its last line."""
    built = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), name, "cpu"],
                           capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return built.stdout.strip().splitlines()[-1]


def build_service_images() -> dict[str, float]:
    """PostgreSQL's, Label Studio's and HAProxy's images on the local base; seconds each."""
    seconds = {}
    for image, folder in SERVICE_IMAGES.items():
        started = time.monotonic()
        built = podman("build", "--pull=never", "--build-arg", f"BASE={BASE}", "--tag", image,
                       str(ROOT / "deploy" / folder), timeout=1800)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        seconds[image] = time.monotonic() - started
    return seconds


def shared_folder(copy_of: Path | None = None) -> Path:
    """A folder the containers' uid 1000 can read and write (pytest's own temporary
    folders are private to root), holding a copy of `copy_of` where given. The caller
    removes it (shutil.rmtree)."""
    root = Path(tempfile.mkdtemp(prefix="visionloop-containers-"))
    root.chmod(0o777)
    if copy_of is not None:
        shutil.copytree(copy_of, root, dirs_exist_ok=True)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o644)
    return root

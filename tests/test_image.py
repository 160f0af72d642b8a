"""The visionloop image, built and run for real with podman (`make test-containers`).

deploy/build-image.sh builds it from the local base image and the project's wheel; the
tests run what a deployer runs: the CLI, a short train on real images inside the
container as the unprivileged user, and the export's files on the host's volume.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.conftest import MINORITY
from tests.containers import podman, shared_folder

pytestmark = pytest.mark.container


def test_the_image_runs_the_cli_as_an_unprivileged_user(visionloop_image):
    image = visionloop_image
    version = podman("run", "--rm", image, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("visionloop 0.1")
    uid = podman("run", "--rm", "--entrypoint", "id", image, "-u")
    assert uid.stdout.strip() == "1000"
    java = podman("run", "--rm", "--entrypoint", "java", image, "-version")
    assert java.returncode == 0 and "17" in java.stderr  # TorchServe's frontend
    # TorchServe's unregister runs `kill -9 PID`: without it a promotion cannot retire a version
    kill = podman("run", "--rm", "--entrypoint", "test", image, "-x", "/bin/kill")
    assert kill.returncode == 0, kill.stdout + kill.stderr


@pytest.fixture
def data_and_store(small_scenario):
    """The scenario and an empty model store, where the container's uid 1000 reaches them."""
    data, store = shared_folder(small_scenario), shared_folder()
    yield data, store
    shutil.rmtree(data)
    shutil.rmtree(store)


def test_a_short_train_inside_the_container_exports_a_servable_version(visionloop_image,
                                                                      data_and_store):
    data, out = data_and_store
    started = time.monotonic()
    trained = podman("run", "--rm", "--network=none",
                     "--volume", f"{data}:/srv/data:ro",
                     "--volume", f"{out}:/srv/model_store",
                     visionloop_image, "train", "--data", "/srv/data", "--out", "/srv/model_store",
                     "--name", "fm", "--learner", "head", "--image-size", "32",
                     "--minority", ",".join(MINORITY), "--num-workers", "0",
                     "--no-show-progress", "--work-dir", "/srv/model_store/runs",
                     timeout=900)
    took = time.monotonic() - started
    assert trained.returncode == 0, trained.stderr[-3000:]
    [version_dir] = [p for p in (out / "fm").iterdir() if p.is_dir() and p.name.startswith("v")]
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["name"] == "fm" and manifest["classes"]
    assert (version_dir / "model.onnx").stat().st_size > 0
    assert (version_dir / "model.torchscript.pt").stat().st_size > 0
    assert (version_dir / "model.onnx").stat().st_uid == 1000  # written by the image's user
    print(f"\ntrain inside the container (head, 32 px, the small scenario): {took:.0f} s, "
          f"test macro-F1 {manifest['metrics']['test']['macro_f1']:.3f}")

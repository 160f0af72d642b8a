"""Shared fixtures: small real Fashion-MNIST slices (Debian files) and a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionloop.trainer import fashion_mnist

MINORITY = ("coat", "sandal", "bag")


def _order_line(config: pytest.Config) -> str | None:
    seed = config.getoption("randomly_seed", None)
    return None if seed is None else (f"test order shuffled by pytest-randomly, seed {seed} "
                                      f"(--randomly-seed={seed} repeats it)")


def pytest_collection_finish(session: pytest.Session) -> None:
    line = _order_line(session.config)
    if line:  # -q hides pytest-randomly's own header line
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(line)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    line = _order_line(config)
    if line:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def small_scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images of each majority class and 10 of each minority class; balanced val/test."""
    out = tmp_path_factory.mktemp("data") / "fm-small"
    fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
        out=out, minority=MINORITY, imbalance_ratio=6, train_per_class=60, pool_per_class=12,
        val_per_class=20, test_per_class=30, seed=0))
    return out


@pytest.fixture(scope="session")
def trained_version(small_scenario: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fine-tune on the small scenario (pretrained Lite0, 32 px), published."""
    from visionloop.trainer.config import TrainConfig
    from visionloop.trainer.train import run_training

    store = tmp_path_factory.mktemp("store")
    cfg = TrainConfig(data=str(small_scenario), out=str(store), name="fm", epochs=4,
                      learner="finetune", image_size=32,
                      freeze_epochs=1, batch_size=32, num_workers=0, show_progress=False,
                      minority=MINORITY, work_dir=str(store / "runs"))
    return run_training(cfg)


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory):
    """The real Label Studio (from .venv-labelstudio) on a free loopback port.

    Its local-files root is a folder the tests put their capture stores under. A server
    that cannot start fails the tests that need it: it is never skipped.
    """
    from visionloop.core.ports import free_loopback_ports
    from visionloop.labeling import server

    root = tmp_path_factory.mktemp("labelstudio")
    (port,) = free_loopback_ports(1)
    cfg = server.LabelStudioConfig(data_dir=root / "data", files_root=root / "files", port=port)
    server.start(cfg)
    yield cfg
    server.stop(cfg)


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL on a free loopback port, for the whole session (tests/postgres.py)."""
    from tests import postgres

    db = postgres.start()
    yield db
    postgres.stop(db)


@pytest.fixture(params=["sqlite", "postgresql"])
def capture_database(request) -> str | None:
    """Each capture-store test runs on both index backends: None is the default SQLite file
    in the capture directory; otherwise the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    import uuid

    from tests import postgres

    server = request.getfixturevalue("postgres_server")
    return postgres.create_database(server, f"captures_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def visionloop_image() -> str:
    """The visionloop image, built once per session by deploy/build-image.sh (podman)."""
    import time

    from tests.containers import VISIONLOOP_IMAGE, build_visionloop_image, podman

    started = time.monotonic()
    summary = build_visionloop_image()
    size = int(podman("image", "inspect", VISIONLOOP_IMAGE, "--format", "{{.Size}}").stdout)
    print(f"\n{summary} ({time.monotonic() - started:.0f} s in the test, {size / 1e9:.2f} GB)")
    return VISIONLOOP_IMAGE

"""Label Studio on a real PostgreSQL (Debian's server, started here): it migrates onto it,
the push / annotate / pull round trip works, and a kill -9 loses nothing (the same check
as on SQLite, tests/test_labelstudio.py)."""

from __future__ import annotations

import hashlib
import time

import pytest

from tests import postgres
from tests.test_labelstudio import (  # noqa: F401 - pool_predictions is a fixture
    MINORITY,
    capture_store,
    choice,
    kill_9_loses_nothing,
    pool_predictions,
    project_for,
    tasks_of,
)
from visionloop.core.ports import free_loopback_ports
from visionloop.labeling import server
from visionloop.labeling.pull import pull
from visionloop.labeling.push import PushOptions, push

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database():
    db = postgres.start()
    yield db
    postgres.stop(db)


@pytest.fixture(scope="module")
def labelstudio_on_postgres(database, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("labelstudio-pg")
    (port,) = free_loopback_ports(1)
    cfg = server.LabelStudioConfig(data_dir=root / "data", files_root=root / "files", port=port,
                                   database_url=database.url)
    started = time.monotonic()
    server.start(cfg)  # the first start migrates the empty database
    print(f"\nLabel Studio migrated onto PostgreSQL and healthy in "
          f"{time.monotonic() - started:.1f}s")
    yield cfg
    server.stop(cfg)


def test_label_studio_keeps_its_data_in_postgresql(labelstudio_on_postgres, database):
    assert server.database_env(database.url)["DJANGO_DB"] == "default"
    assert not any(labelstudio_on_postgres.data_dir.glob("*.sqlite3"))  # nothing on SQLite
    tables = postgres.query(database, "SELECT count(*) FROM information_schema.tables "
                                      "WHERE table_name = 'task'")
    assert tables == "1"


def test_round_trip_on_postgresql(labelstudio_on_postgres, database, trained_version,
                                  pool_predictions, tmp_path):  # noqa: F811
    cfg = labelstudio_on_postgres
    root = capture_store(cfg, "round-trip", pool_predictions[:20])
    client, manifest, project = project_for(cfg, trained_version, "postgres round trip")
    started = time.monotonic()
    pushed = push(root, client, project, manifest.name, MINORITY, PushOptions(budget=10),
                  files_root=cfg.files_root)
    push_s = time.monotonic() - started
    assert pushed.pushed == 10
    truth = {hashlib.sha256(d).hexdigest(): label for d, _, label in pool_predictions}
    for task in tasks_of(client, project):
        client.annotations.create(id=task.id, result=choice(truth[task.data["capture_sha"]]))
    started = time.monotonic()
    pulled = pull(tmp_path / "labels", root, client, project)
    pull_s = time.monotonic() - started
    assert pulled.added == 10
    tree = {p.name.split(".")[0]: p.parent.name
            for p in (tmp_path / "labels" / "images").rglob("*.png")}
    assert tree == {sha: truth[sha] for sha in tree} and len(tree) == 10
    annotations = postgres.query(database, "SELECT count(*) FROM task_completion "
                                           f"WHERE project_id = {project.id}")
    assert annotations == "10"  # the annotations live in PostgreSQL
    print(f"\nPostgreSQL: push of 10 tasks {push_s:.1f}s, pull of 10 labels {pull_s:.1f}s")


def test_kill_9_loses_nothing_on_postgresql(labelstudio_on_postgres, trained_version,
                                            pool_predictions, tmp_path):  # noqa: F811
    restarts = kill_9_loses_nothing(labelstudio_on_postgres, trained_version, pool_predictions,
                                    tmp_path)
    print(f"\nPostgreSQL: Label Studio back {restarts[0]:.1f}s and {restarts[1]:.1f}s after "
          f"restarts from kill -9")
    assert server.healthy(labelstudio_on_postgres)  # up again after both restarts

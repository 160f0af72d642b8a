"""Labeling against a real Label Studio: push, ranking, dedupe, idempotent re-push,
annotation as an annotator would, pull with edits and deletions, webhooks, the ML backend
called by Label Studio itself, and Label Studio killed (kill -9) in the middle of a push and
of a pull."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio
from PIL import Image

from tests.servers import metric_samples
from visionloop.core.capture_store import DB_FILE, CaptureStore
from visionloop.core.manifest import ModelManifest
from visionloop.core.model_store import ModelStore
from visionloop.core.ports import free_loopback_ports
from visionloop.core.registry import Registry
from visionloop.core.scenario import read_pool
from visionloop.labeling import server
from visionloop.labeling.backend_auth import SECRET_HEADER
from visionloop.labeling.backend_server import BackendServer, serve_in_thread
from visionloop.labeling.client import AuthHeader, LabelStudioUnavailable, connect
from visionloop.labeling.events import RetrainTrigger
from visionloop.labeling.label_check import REVIEW_BELOW
from visionloop.labeling.loop_metrics import LoopStores
from visionloop.labeling.predictor import Predictor
from visionloop.labeling.project import (
    FROM_NAME,
    QUEUE_MODEL_VERSION,
    TO_NAME,
    connect_backend,
    ensure_project,
)
from visionloop.labeling.pull import annotator_report, labelled_counts, pull
from visionloop.labeling.push import PushOptions, push, queue_score
from visionloop.serving.capture import CapturePolicy, Capturer
from visionloop.serving.offline import InProcessModel

pytestmark = pytest.mark.slow
MINORITY = ["coat", "sandal", "bag"]


@pytest.fixture(scope="module")
def pool_predictions(small_scenario: Path, trained_version: Path):
    """(image bytes, reply, true label) for every pool image, from the served model path."""
    pool = read_pool(small_scenario)
    data = [path.read_bytes() for path, _ in pool]
    replies = InProcessModel(trained_version).predict(data)
    return [(d, r, label) for d, r, (_, label) in zip(data, replies, pool, strict=True)]


def capture_store(labelstudio, name: str, predictions) -> Path:
    """A capture store under Label Studio's local-files root holding every prediction."""
    root = labelstudio.files_root / name
    store = Capturer(root, CapturePolicy(max_confidence=1.01, per_minute=10**6))
    assert all(store.capture_batch([(d, f"req-{i}", r) for i, (d, r, _) in
                                    enumerate(predictions)]))
    return root


def links(root: Path) -> dict[str, int | None]:
    store = CaptureStore(root)
    try:
        return {r.sha: r.task_id for r in store.captures()}
    finally:
        store.close()


def project_for(labelstudio, trained_version: Path, title: str):
    client = connect(labelstudio)
    manifest = ModelManifest.load(trained_version)
    return client, manifest, ensure_project(client, title, manifest.classes)


def tasks_of(client, project) -> list:
    return list(client.tasks.list(project=project.id, fields="all"))


def choice(label: str) -> list[dict]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [label]}}]


def test_push_ranks_imports_predictions_and_is_idempotent(labelstudio, trained_version,
                                                          pool_predictions):
    root = capture_store(labelstudio, "push", pool_predictions)
    client, manifest, project = project_for(labelstudio, trained_version, "push test")
    assert ensure_project(client, "push test", manifest.classes).id == project.id  # found again

    options = PushOptions(budget=8, strategy="least_confidence", chunk_size=3)
    result = push(root, client, project, manifest.name, MINORITY, options,
                  files_root=labelstudio.files_root)
    assert result.pushed == 8 and len(set(result.task_ids)) == 8

    # the 8 least confident distinct images became the tasks, each with the model's guess
    by_sha = {}
    for data, reply, _ in pool_predictions:
        by_sha[hashlib.sha256(data).hexdigest()] = reply
    expected = sorted(by_sha, key=lambda s: by_sha[s].uncertainty.max_prob)[:8]
    tasks = tasks_of(client, project)
    assert sorted(t.data["capture_sha"] for t in tasks) == sorted(expected)
    for task in tasks:
        reply = by_sha[task.data["capture_sha"]]
        (prediction,) = task.predictions
        # the guess, in the queue's version; its score is the queue position, the
        # confidence is in the task data
        assert prediction.model_version == QUEUE_MODEL_VERSION
        assert prediction.score == pytest.approx(queue_score(1, task.data["priority"], 8))
        assert task.data["confidence"] == pytest.approx(reply.uncertainty.max_prob, abs=1e-4)
        assert task.data["model_version"] == manifest.version
        assert prediction.result[0]["value"]["choices"] == [reply.label]
        # the image is served by Label Studio from the capture store, not copied into it
        assert task.data["capture_image"].startswith("/data/local-files/?d=push/images/")
        # 28 px: annotators are shown an enlarged copy (labeling.display)
        assert task.data["image"].startswith("/data/local-files/?d=push/display/")
    linked = links(root)
    assert {s: linked[s] for s in expected} == {t.data["capture_sha"]: t.id for t in tasks}

    # a repeat with nothing new creates nothing; a lost record is found again, not re-imported
    assert push(root, client, project, manifest.name, MINORITY,
                PushOptions(budget=0), files_root=labelstudio.files_root).pushed == 0
    conn = sqlite3.connect(root / DB_FILE, isolation_level=None)  # a record lost in a crash
    conn.execute("UPDATE captures SET task_id = NULL WHERE image_sha256 IN (?, ?)",
                 tuple(expected[:2]))
    conn.close()
    again = push(root, client, project, manifest.name, MINORITY, PushOptions(budget=4),
                 files_root=labelstudio.files_root)
    assert again.reconciled == 2 and again.pushed == 4
    shas = [t.data["capture_sha"] for t in tasks_of(client, project)]
    assert len(shas) == 12 and len(set(shas)) == 12  # no image is ever two tasks


def test_a_task_deleted_in_label_studio_is_pushed_again(labelstudio, trained_version,
                                                        pool_predictions):
    root = capture_store(labelstudio, "deleted", pool_predictions[:6])
    client, manifest, project = project_for(labelstudio, trained_version, "deletion test")
    options = PushOptions(budget=3, strategy="least_confidence")
    push(root, client, project, manifest.name, MINORITY, options,
         files_root=labelstudio.files_root)
    victim = tasks_of(client, project)[0]
    client.tasks.delete(id=victim.id)
    again = push(root, client, project, manifest.name, MINORITY, options,
                 files_root=labelstudio.files_root)
    assert again.unlinked_deleted == 1 and again.pushed == 3
    shas = {t.data["capture_sha"]: t.id for t in tasks_of(client, project)}
    assert len(shas) == 5  # 2 kept + 3 new, each image once
    assert victim.data["capture_sha"] in shas and shas[victim.data["capture_sha"]] != victim.id
    assert links(root)[victim.data["capture_sha"]] == shas[victim.data["capture_sha"]]


def test_duplicates_become_the_existing_task(labelstudio, trained_version, pool_predictions):
    root = capture_store(labelstudio, "dupes", pool_predictions[:20])
    client, manifest, project = project_for(labelstudio, trained_version, "dedupe test")
    first = push(root, client, project, manifest.name, MINORITY,
                 PushOptions(budget=20, strategy="least_confidence"),
                 files_root=labelstudio.files_root)
    tasks = {t.data["capture_sha"]: t.id for t in tasks_of(client, project)}
    # the same bytes again, and the same garment re-encoded as JPEG
    data, reply, _ = pool_predictions[0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").save(buf, "JPEG", quality=75)
    store = Capturer(root, CapturePolicy(max_confidence=1.01))
    assert store.capture_batch([(data, "again", reply), (buf.getvalue(), "jpeg", reply)]) == \
        [True, True]
    second = push(root, client, project, manifest.name, MINORITY,
                  PushOptions(budget=20, strategy="least_confidence"),
                  files_root=labelstudio.files_root)
    assert second.pushed == 0 and second.exact_duplicates == 1 and second.near_duplicates == 1
    assert len(tasks_of(client, project)) == first.pushed
    original_task = tasks[hashlib.sha256(data).hexdigest()]
    assert links(root)[hashlib.sha256(buf.getvalue()).hexdigest()] == original_task


def test_class_balanced_push_prefers_minority_classes(labelstudio, trained_version,
                                                      pool_predictions):
    root = capture_store(labelstudio, "balanced", pool_predictions)
    client, manifest, project = project_for(labelstudio, trained_version, "balanced test")
    result = push(root, client, project, manifest.name, MINORITY,
                  PushOptions(budget=10, strategy="class_balanced", minority_share=0.6),
                  files_root=labelstudio.files_root)
    minority_idx = [manifest.classes.index(c) for c in MINORITY]
    mass = {t.data["capture_sha"]: 0.0 for t in tasks_of(client, project)}
    assert len(mass) == 10
    all_mass = sorted((sum(r.probabilities[i] for i in minority_idx),
                       hashlib.sha256(d).hexdigest()) for d, r, _ in pool_predictions)
    top6 = {sha for _, sha in all_mass[-6:]}
    assert top6 <= set(mass), "the 6 reserved places go to the highest minority mass"
    assert result.pushed == 10


def test_annotations_are_pulled_with_edits_deletions_and_unknown_labels(
        labelstudio, trained_version, pool_predictions, tmp_path):
    root = capture_store(labelstudio, "pull", pool_predictions[:12])
    client, manifest, project = project_for(labelstudio, trained_version, "pull test")
    push(root, client, project, manifest.name, MINORITY, PushOptions(budget=6),
         files_root=labelstudio.files_root)
    truth = {hashlib.sha256(d).hexdigest(): label for d, _, label in pool_predictions}
    tasks = tasks_of(client, project)
    # someone adds a class in Label Studio that the model does not have
    config = client.projects.get(id=project.id).label_config
    client.projects.update(id=project.id,
                           label_config=config.replace("</Choices>", '<Choice value="hat"/>'
                                                       "</Choices>"))
    answers = {}
    for task in tasks[:4]:
        answers[task.id] = truth[task.data["capture_sha"]]
        client.annotations.create(id=task.id, result=choice(answers[task.id]))
    client.annotations.create(id=tasks[4].id, result=choice("hat"))
    client.annotations.create(id=tasks[5].id, result=[], was_cancelled=True)  # skipped

    labels = tmp_path / "labels"
    first = pull(labels, root, client, project)
    assert (first.added, first.changed, first.removed) == (5, 0, 0)
    assert first.unknown_labels == {"hat": 1} and first.skipped_tasks == 1
    tree = {p.name.split(".")[0]: p.parent.name for p in (labels / "images").rglob("*.png")}
    assert tree == {t.data["capture_sha"]: answers[t.id] for t in tasks[:4]}
    assert sum(labelled_counts(labels).values()) == 4

    again = pull(labels, root, client, project)  # nothing new: nothing changes
    assert (again.added, again.changed, again.removed) == (0, 0, 0)
    # a pull that died after its database commit left the tree short: the next one completes it
    next((labels / "images").rglob("*.png")).unlink()
    resumed = pull(labels, root, client, project)
    assert (resumed.added, resumed.changed, resumed.removed) == (0, 0, 0)
    assert len(list((labels / "images").rglob("*.png"))) == 4

    # an annotator corrects one answer and deletes another
    edited, deleted = tasks[0], tasks[1]
    new_label = next(c for c in manifest.classes if c != answers[edited.id])
    client.annotations.update(id=client.tasks.get(id=edited.id).annotations[0]["id"],
                              result=choice(new_label))
    client.annotations.delete(id=client.tasks.get(id=deleted.id).annotations[0]["id"])
    third = pull(labels, root, client, project)
    assert (third.added, third.changed, third.removed) == (0, 1, 1)
    tree = {p.name.split(".")[0]: p.parent.name for p in (labels / "images").rglob("*.png")}
    assert tree[edited.data["capture_sha"]] == new_label
    assert deleted.data["capture_sha"] not in tree and len(tree) == 3


def next_task_id(labelstudio, project) -> int:
    """What Label Studio hands this annotator next (the labelling stream's own call)."""
    request = urllib.request.Request(
        f"{labelstudio.url}/api/projects/{project.id}/next",
        headers={"Authorization": f"Token {server.api_token(labelstudio)}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["id"]


def test_the_annotator_gets_push_rank_1_next(labelstudio, trained_version, pool_predictions,
                                             tmp_path):
    root = capture_store(labelstudio, "queue", pool_predictions)
    client, manifest, project = project_for(labelstudio, trained_version, "queue test")
    first = push(root, client, project, manifest.name, MINORITY,
                 PushOptions(budget=5, strategy="class_balanced"),
                 files_root=labelstudio.files_root)
    seen = {"first push": (next_task_id(labelstudio, project), first.task_ids[0])}

    # the ML backend connected, its predictions (its model's version) on every task
    store = trained_version.parent.parent
    predictor = Predictor(store, manifest.name, manifest.version, labelstudio.url,
                          server.api_token(labelstudio))
    secret = server.backend_secret(labelstudio)
    backend = BackendServer(("127.0.0.1", 0), predictor,
                            RetrainTrigger(tmp_path / "events.json", 10**6, None), secret)
    serve_in_thread(backend)
    try:
        connect_backend(client, project, backend.url, secret)
        client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                              selected_items={"all": False, "included": first.task_ids})
        deadline = time.monotonic() + 60
        while not all(len(t.predictions) == 2 for t in tasks_of(client, project)):
            assert time.monotonic() < deadline, "the ML backend's predictions never came"
            time.sleep(1)
        seen["ML backend connected"] = (next_task_id(labelstudio, project), first.task_ids[0])
        # the annotator labels it: the next is push's rank 2
        client.annotations.create(id=first.task_ids[0], result=choice(manifest.classes[0]))
        seen["after one label"] = (next_task_id(labelstudio, project), first.task_ids[1])
        client.annotations.create(id=first.task_ids[1], result=choice(manifest.classes[0]))
    finally:
        backend.shutdown()
        backend.server_close()

    # a second push with another strategy: the newest ranking comes first
    second = push(root, client, project, manifest.name, MINORITY,
                  PushOptions(budget=4, strategy="least_confidence"),
                  files_root=labelstudio.files_root)
    seen["second push (least confidence)"] = (next_task_id(labelstudio, project),
                                              second.task_ids[0])
    client.annotations.create(id=second.task_ids[0], result=choice(manifest.classes[0]))

    # a promotion: v2 serves, its captures are pushed
    capturer = Capturer(root, CapturePolicy(max_confidence=1.01, per_minute=10**6))
    promoted = [(d, f"v2-{i}", replace(r, version="v2"))
                for i, (d, r, _) in enumerate(pool_predictions)]
    assert all(capturer.capture_batch(promoted))
    third = push(root, client, project, manifest.name, MINORITY,
                 PushOptions(budget=3, strategy="class_balanced"),
                 files_root=labelstudio.files_root)
    assert {t.data["model_version"] for t in tasks_of(client, project)
            if t.id in third.task_ids} == {"v2"}
    seen["after a promotion (v2)"] = (next_task_id(labelstudio, project), third.task_ids[0])
    assert client.projects.get(id=project.id).model_version == QUEUE_MODEL_VERSION
    print("\nnext task handed out / push's rank 1:")
    for case, (handed, rank_1) in seen.items():
        print(f"  {case}: {handed} / {rank_1}")
    assert all(handed == rank_1 for handed, rank_1 in seen.values()), seen


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_webhook_events_reach_the_receiver_and_trigger_retraining(
        labelstudio, trained_version, pool_predictions, tmp_path):
    root = capture_store(labelstudio, "webhook", pool_predictions[:6])
    client, manifest, project = project_for(labelstudio, trained_version, "webhook test")
    push(root, client, project, manifest.name, MINORITY,
         PushOptions(budget=3, transport="base64"), files_root=labelstudio.files_root)
    assert all(t.data["image"].startswith("data:image/png;base64,")
               for t in tasks_of(client, project))
    marker = tmp_path / "retrained"
    trigger = RetrainTrigger(tmp_path / "events.json", threshold=2,
                             command=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    secret = server.backend_secret(labelstudio)
    backend = BackendServer(("127.0.0.1", 0), None, trigger, secret)
    serve_in_thread(backend)
    try:
        actions = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
        client.webhooks.create(url=f"{backend.url}/webhook", project=project.id,
                               send_payload=True, send_for_all_actions=False, actions=actions,
                               headers={SECRET_HEADER: secret})
        # a second webhook someone set up without the secret: refused, counted, no effect
        client.webhooks.create(url=f"{backend.url}/webhook/", project=project.id,
                               send_payload=True, send_for_all_actions=False, actions=actions)
        for task in tasks_of(client, project)[:2]:
            client.annotations.create(id=task.id, result=choice(manifest.classes[0]))
        trigger.wait(30)
        assert trigger.state["events"] == {"ANNOTATION_CREATED": 2}
        assert trigger.state["triggers"] == 1 and marker.exists()
        # anyone else who can reach the port: a forged event, a wrong secret
        forged = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}
        assert post(f"{backend.url}/webhook", forged) == 401
        assert post(f"{backend.url}/webhook", forged, {SECRET_HEADER: "x" * 43}) == 401
        assert trigger.state["unauthorised"] == {"/webhook": 4}  # 2 from Label Studio
        assert trigger.state["events"] == {"ANNOTATION_CREATED": 2}
        assert trigger.state["triggers"] == 1
        print(f"\nwebhooks: {trigger.state['unauthorised']} refused with 401, "
              f"{trigger.state['events']} accepted")
    finally:
        backend.shutdown()
        backend.server_close()


def test_label_studio_calls_the_ml_backend_for_predictions(labelstudio, trained_version,
                                                           pool_predictions, tmp_path):
    client, manifest, project = project_for(labelstudio, trained_version, "ml backend test")
    # tasks created elsewhere (no prediction), with the image inline
    sample = pool_predictions[:3]
    response = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": "data:image/png;base64," + base64.b64encode(d).decode()}}
        for d, _, _ in sample])
    store = trained_version.parent.parent
    predictor = Predictor(store, manifest.name, manifest.version, labelstudio.url,
                          server.api_token(labelstudio))
    marker = tmp_path / "trained"
    trigger = RetrainTrigger(tmp_path / "ml-events.json", 10**6,
                             [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    secret = server.backend_secret(labelstudio)
    backend = BackendServer(("127.0.0.1", 0), predictor, trigger, secret)
    serve_in_thread(backend)
    try:
        connect_backend(client, project, backend.url, secret)
        connect_backend(client, project, backend.url, secret)  # idempotent
        (ml,) = client.ml.list(project=project.id)
        assert ml.auth_method == "BASIC_AUTH"
        assert len(client.webhooks.list(project=str(project.id))) == 1
        client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                              selected_items={"all": False, "included": response.task_ids})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tasks = {t.id: t for t in tasks_of(client, project)}
            if all(tasks[i].predictions for i in response.task_ids):
                break
            time.sleep(1)
        for task_id, (_, reply, _) in zip(response.task_ids, sample, strict=True):
            (prediction,) = tasks[task_id].predictions
            assert prediction.model_version == f"{manifest.name}-{manifest.version}"
            assert prediction.result[0]["value"]["choices"] == [reply.label]
            assert prediction.score == pytest.approx(reply.predictions[0].probability,
                                                     abs=1e-5)
        # "Start Training" in Label Studio: the retrain command starts at once
        client.ml.train(id=ml.id)
        trigger.wait(30)
        assert marker.exists() and trigger.state["triggers"] == 1
        assert trigger.state["events"].get("START_TRAINING") == 1
        # the ML-backend routes refuse callers without the secret, and run nothing
        wrong = "Basic " + base64.b64encode(b"visionloop:not-the-secret").decode()
        assert post(f"{backend.url}/predict", {"tasks": []}) == 401
        assert post(f"{backend.url}/setup", {}, {"Authorization": wrong}) == 401
        assert post(f"{backend.url}/webhook", {"action": "START_TRAINING"}) == 401
        assert trigger.state["unauthorised"] == {"/predict": 1, "/setup": 1, "/webhook": 1}
        assert trigger.state["triggers"] == 1
        print(f"\nML backend: {trigger.state['unauthorised']} refused with 401; "
              f"START_TRAINING started the command")
    finally:
        backend.shutdown()
        backend.server_close()


def test_two_annotators_overlap_and_disagreements_follow_the_rule(
        labelstudio, trained_version, pool_predictions, tmp_path):
    root = capture_store(labelstudio, "two", pool_predictions[:8])
    client, manifest, project = project_for(labelstudio, trained_version, "two annotators")
    client.projects.update(id=project.id, maximum_annotations=2, overlap_cohort_percentage=100)
    push(root, client, project, manifest.name, MINORITY, PushOptions(budget=4),
         files_root=labelstudio.files_root)
    second_email = "second@visionloop.invalid"
    second = LabelStudio(base_url=labelstudio.url,
                         api_key=server.add_annotator(labelstudio, second_email))
    tasks = sorted(tasks_of(client, project), key=lambda t: t.data["priority"])
    c = manifest.classes
    # agree on two tasks, disagree on two; the second annotator answers last (newer)
    for task, first_says, second_says in zip(tasks, (c[0], c[1], c[2], c[3]),
                                             (c[0], c[1], c[4], c[5]), strict=True):
        client.annotations.create(id=task.id, result=choice(first_says))
        second.annotations.create(id=task.id, result=choice(second_says))
    # a reviewer marks the first annotator's answer on task 3 as ground truth
    mine = {a.completed_by: a.id for a in client.annotations.list(id=tasks[2].id)}
    assert len(mine) == 2, mine  # one answer from each annotator
    client.annotations.update(id=mine[client.users.whoami().id], ground_truth=True)

    labels = tmp_path / "labels"
    first = pull(labels, root, client, project)
    decided = tree_labels(labels)
    # agreement -> that label; ground truth decides; a tie is not decided by a rule but goes
    # back for review, and waits
    assert [decided.get(t.data["capture_sha"]) for t in tasks] == [c[0], c[1], c[2], None]
    assert first.sent_for_review == {"annotators disagree": 1}
    assert first.waiting_for_review == 1
    review = review_task_of(client, project, tasks[3].id)
    assert all(f"{name} x1" in review.data["review_note"] for name in (c[3], c[5]))
    again = pull(labels, root, client, project)  # sent once
    assert again.sent_for_review == {} and again.waiting_for_review == 1
    assert len([t for t in tasks_of(client, project) if "review_of" in t.data]) == 1
    client.annotations.create(id=review.id, result=choice(c[5]))  # the reviewer decides
    reviewed = pull(labels, root, client, project)
    assert reviewed.reviewed == 1 and reviewed.waiting_for_review == 0
    assert tree_labels(labels)[tasks[3].data["capture_sha"]] == c[5]
    report = annotator_report(labels)
    assert report["annotators"] == {
        labelstudio.username: {"answers": 4, "agree_with_label": 0.75},
        second_email: {"answers": 4, "agree_with_label": 0.75}}
    assert report["pairs"] == {f"{labelstudio.username} | {second_email}":
                               {"shared_tasks": 4, "agreement": 0.5}}
    assert report["tasks_with_several_answers"] == 4 and report["tasks_with_disagreement"] == 2
    shown = run_cli("label", "status", "--labels-dir", str(labels),
                    "--capture-dir", str(root))
    status = json.loads(shown.stdout)
    assert shown.returncode == 0 and {k: status[k] for k in report} == report
    assert status["reviews"] == {"waiting": 0, "decided": 1,
                                 "by_reason": {"annotators disagree": 1}}
    print(f"\nvisionloop label status: {json.dumps(report)}")


def tree_labels(labels: Path) -> dict[str, str]:
    """Image sha -> the class folder pull put it in (what trains)."""
    return {p.name.split(".")[0]: p.parent.name for p in (labels / "images").rglob("*")
            if p.is_file()}


def review_task_of(client, project, task_id: int):
    reviews = [t for t in tasks_of(client, project) if t.data.get("review_of") == task_id]
    assert len(reviews) == 1, reviews
    return reviews[0]


def test_a_label_the_model_contradicts_goes_back_for_review_once(
        labelstudio, trained_version, pool_predictions, tmp_path):
    # images with a class the model is sure they are not, whichever two push picks
    sure_not = [p for p in pool_predictions if min(p[1].probabilities) < REVIEW_BELOW / 2]
    assert len(sure_not) >= 8, "the fixture model is unsure of every class of most images"
    root = capture_store(labelstudio, "check", sure_not[:8])
    client, manifest, project = project_for(labelstudio, trained_version, "label check")
    push(root, client, project, manifest.name, MINORITY, PushOptions(budget=2),
         files_root=labelstudio.files_root)
    tasks = sorted(tasks_of(client, project), key=lambda t: t.data["priority"])
    store = CaptureStore(root)
    served = store.served_probabilities(manifest.name)
    store.close()
    doubted, trusted = tasks
    probs = served[doubted.data["capture_sha"]]
    least = min(range(len(probs)), key=probs.__getitem__)
    assert probs[least] < REVIEW_BELOW, probs  # a class the model is sure it is not
    wrong = manifest.classes[least]
    likely = manifest.classes[max(range(len(probs)), key=served[trusted.data["capture_sha"]]
                                  .__getitem__)]
    client.annotations.create(id=doubted.id, result=choice(wrong))
    client.annotations.create(id=trusted.id, result=choice(likely))

    labels = tmp_path / "labels"
    first = pull(labels, root, client, project, model=manifest.name)
    assert first.sent_for_review == {"model disagrees": 1} and first.labelled_tasks == 1
    assert tree_labels(labels) == {trusted.data["capture_sha"]: likely}
    review = review_task_of(client, project, doubted.id)
    assert f"Labelled '{wrong}'" in review.data["review_note"]
    assert review.data["image"] == doubted.data["image"]
    assert next_task_id(labelstudio, project) == review.id  # reviews come first
    assert pull(labels, root, client, project, model=manifest.name).sent_for_review == {}
    right = next(c for c in manifest.classes if c != wrong)
    client.annotations.create(id=review.id, result=choice(right))
    done = pull(labels, root, client, project, model=manifest.name)
    assert done.reviewed == 1 and done.labelled_tasks == 2
    assert tree_labels(labels)[doubted.data["capture_sha"]] == right
    # a review once answered decides, with the model's check off too
    unchecked = tmp_path / "unchecked"
    pull(unchecked, root, client, project, model=manifest.name, review_below=None)
    assert tree_labels(unchecked)[doubted.data["capture_sha"]] == right

    # the loop's metrics, scraped as Prometheus would, against the stores they count
    store_dir = trained_version.parent.parent
    stores = LoopStores(labels, root, store_dir, manifest.name)
    backend = BackendServer(("127.0.0.1", 0), None, RetrainTrigger(
        labels / "events.json", 10, None), server.backend_secret(labelstudio), stores)
    serve_in_thread(backend)
    try:
        with urllib.request.urlopen(f"{backend.url}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        backend.shutdown()
        backend.server_close()
    scraped = metric_samples(text)
    captures = CaptureStore(root)
    try:
        stored = [c for c in captures.captures() if c.model_name == manifest.name]
        pushed = captures.pushed_tasks(manifest.name)
    finally:
        captures.close()
    assert scraped[("visionloop_captures", ())] == len(stored)
    assert scraped[("visionloop_tasks_pushed", ())] == len(pushed) == 2
    assert scraped[("visionloop_labels_pulled", ())] == sum(labelled_counts(labels).values())
    assert scraped[("visionloop_reviews_decided", ())] == 1
    assert scraped[("visionloop_labels_waiting_for_review", ())] == 0
    champion = Registry(ModelStore(store_dir), manifest.name).champion()
    assert scraped[("visionloop_champion_version", ())] == int(champion.lstrip("v"))
    assert ("visionloop_ml_backend_predict_seconds_count", ()) in scraped
    print(f"\nscraped: {len(stored)} captures, {len(pushed)} tasks, "
          f"{scraped[('visionloop_labels_pulled', ())]:.0f} labels, 1 review decided")


def test_a_personal_access_token_works_for_every_call_the_project_makes(
        labelstudio, trained_version, pool_predictions, tmp_path):
    legacy = connect(labelstudio)
    legacy.jwt_settings.update(api_token_ttl_days=30, api_tokens_enabled=True,
                               legacy_api_tokens_enabled=True)
    token = legacy.tokens.create().token  # what a user copies from "Account & Settings"
    assert AuthHeader(labelstudio.url, token).personal
    client = LabelStudio(base_url=labelstudio.url, api_key=token)
    manifest = ModelManifest.load(trained_version)
    project = ensure_project(client, "personal token test", manifest.classes)
    root = capture_store(labelstudio, "personal", pool_predictions[:6])
    assert push(root, client, project, manifest.name, MINORITY, PushOptions(budget=3),
                files_root=labelstudio.files_root).pushed == 3
    tasks = tasks_of(client, project)
    for task in tasks:
        client.annotations.create(id=task.id, result=choice(manifest.classes[0]))
    assert pull(tmp_path / "labels", root, client, project).added == 3
    # the ML backend fetches a local-files image (Label Studio serves those with auth)
    store = trained_version.parent.parent
    predictor = Predictor(store, manifest.name, manifest.version, labelstudio.url, token)
    image = predictor.image_bytes(tasks[0].data["capture_image"])
    assert hashlib.sha256(image).hexdigest() == tasks[0].data["capture_sha"]
    assert predictor.auth().startswith("Bearer ")
    (result,) = predictor.predict([{"id": tasks[0].id, "data": tasks[0].data}])
    served = {hashlib.sha256(d).hexdigest(): reply for d, reply, _ in pool_predictions}
    assert result["result"][0]["value"]["choices"] == [
        served[tasks[0].data["capture_sha"]].label], result
    stranger = Predictor(store, manifest.name, manifest.version, labelstudio.url, "0" * 40)
    with pytest.raises(urllib.error.HTTPError) as refused:
        stranger.image_bytes(tasks[0].data["capture_image"])
    assert refused.value.code in (401, 403)


def kill_label_studio(cfg: server.LabelStudioConfig) -> None:
    """kill -9 of the whole server (a crash, not a shutdown); its pid file stays behind."""
    pid = server.read_pid(cfg)
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.read_pid(cfg) is not None:  # reap it: the session fixture is its parent
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert time.monotonic() < deadline, "Label Studio survived kill -9"
        time.sleep(0.1)


class KillOnFirstList:
    """The real client, except that Label Studio is killed as the pull starts reading."""

    def __init__(self, client, cfg: server.LabelStudioConfig) -> None:
        self._client, self._cfg = client, cfg

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    @property
    def tasks(self):
        outer = self

        class Tasks:
            def __getattr__(self, name: str):
                return getattr(outer._client.tasks, name)

            def list(self, *args, **kwargs):
                kill_label_studio(outer._cfg)
                return outer._client.tasks.list(*args, **kwargs)

        return Tasks()


def test_label_studio_killed_mid_push_and_mid_pull_loses_nothing(
        labelstudio, trained_version, pool_predictions, tmp_path):
    restarts = kill_9_loses_nothing(labelstudio, trained_version, pool_predictions, tmp_path)
    print(f"Label Studio back {restarts[0]:.1f}s after a restart from kill -9")


def kill_9_loses_nothing(labelstudio, trained_version, pool_predictions,
                         tmp_path) -> list[float]:
    """Label Studio killed after a push's first chunk and as a pull starts reading: only
    what arrived is recorded, and after each restart push and pull catch up exactly.
    Returns the restart times (s). Shared with the PostgreSQL run."""
    root = capture_store(labelstudio, "down", pool_predictions[:30])
    client, manifest, project = project_for(labelstudio, trained_version, "outage test")
    labels = tmp_path / "labels"

    def kill_after_first_chunk(pushed: int) -> None:
        kill_label_studio(labelstudio)

    options = PushOptions(budget=15, chunk_size=5)
    with pytest.raises(LabelStudioUnavailable):
        push(root, client, project, manifest.name, MINORITY, options,
             on_chunk=kill_after_first_chunk, files_root=labelstudio.files_root)
    assert sum(t is not None for t in links(root).values()) == 5  # only what arrived
    with pytest.raises(LabelStudioUnavailable):
        pull(labels, root, client, project)
    assert not (labels / "images").exists() or not any((labels / "images").rglob("*.png"))

    started = time.monotonic()
    server.start(labelstudio)  # over the stale pid file, on the database it crashed with
    restart_s = time.monotonic() - started
    client = connect(labelstudio)
    result = push(root, client, project, manifest.name, MINORITY, options,
                  files_root=labelstudio.files_root)
    assert result.pushed == 15
    tasks = tasks_of(client, project)
    shas = [t.data["capture_sha"] for t in tasks]
    assert len(shas) == 20 and len(set(shas)) == 20
    linked = links(root)
    assert sorted(t for t in linked.values() if t is not None) == sorted(t.id for t in tasks)
    # by predicted class, serialisable for the CLI
    assert json.loads(json.dumps(result.pushed_classes)) == result.pushed_classes
    assert sum(result.pushed_classes.values()) == 15

    # annotated and pulled once; then a second round dies as pull starts reading
    truth = {hashlib.sha256(d).hexdigest(): label for d, _, label in pool_predictions}
    for task in tasks[:6]:
        client.annotations.create(id=task.id, result=choice(truth[task.data["capture_sha"]]))
    assert pull(labels, root, client, project).added == 6
    for task in tasks[6:10]:
        client.annotations.create(id=task.id, result=choice(truth[task.data["capture_sha"]]))
    db_before = (labels / "labels.sqlite3").read_bytes()
    with pytest.raises(LabelStudioUnavailable):
        pull(labels, root, KillOnFirstList(client, labelstudio), project)
    assert (labels / "labels.sqlite3").read_bytes() == db_before
    assert len(list((labels / "images").rglob("*.png"))) == 6

    started = time.monotonic()
    server.start(labelstudio)
    second_restart_s = time.monotonic() - started
    client = connect(labelstudio)
    caught_up = pull(labels, root, client, project)
    assert (caught_up.added, caught_up.changed, caught_up.removed) == (4, 0, 0)
    tree = {p.name.split(".")[0]: p.parent.name for p in (labels / "images").rglob("*.png")}
    assert tree == {t.data["capture_sha"]: truth[t.data["capture_sha"]] for t in tasks[:10]}
    return [restart_s, second_restart_s]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionloop.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_push_pull_and_an_unreachable_server(labelstudio, trained_version,
                                                 pool_predictions, tmp_path):
    # the CLI serves images from the capture dir as Label Studio's files root
    capture_store(labelstudio, ".", pool_predictions[:10])
    store = trained_version.parent.parent
    common = ["--name", trained_version.parent.name, "--store", str(store),
              "--labelstudio-dir", str(labelstudio.data_dir),
              "--labelstudio-port", str(labelstudio.port),
              "--capture-dir", str(labelstudio.files_root), "--labels-dir", str(tmp_path)]
    pushed = run_cli("label", "push", "--budget", "3", *common)
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    assert summary["pushed"] == 3 and sorted(summary["minority"]) == sorted(MINORITY)
    pulled = run_cli("label", "pull", *common)
    assert pulled.returncode == 0 and json.loads(pulled.stdout)["labelled_tasks"] == 0
    status = run_cli("labelstudio", "status", "--labelstudio-dir", str(labelstudio.data_dir),
                     "--labelstudio-port", str(labelstudio.port))
    assert json.loads(status.stdout)["healthy"] is True

    closed_port = str(free_loopback_ports(1)[0])  # nothing listens there
    down = run_cli("label", "pull", *common[:-6], "--labelstudio-port", closed_port,
                   "--capture-dir", str(labelstudio.files_root), "--labels-dir", str(tmp_path))
    assert down.returncode == 3 and "nothing lost" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr
    assert [line for line in down.stderr.splitlines() if "error:" in line] == [
        down.stderr.strip().splitlines()[-1]]

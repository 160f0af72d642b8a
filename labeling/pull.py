"""`visionloop label pull`: finished annotations become labelled training data.

The labels directory holds:
    labels.sqlite3          one row per labelled task (the truth), and a log of pulls
    images/<class>/<sha>.<ext>   an ImageFolder tree of the known-class labels, for the trainer

Every pull reads all tasks of the project and reconciles: new annotations are added,
edited ones change the label, deleted annotations or tasks remove it, skipped (cancelled)
annotations count for nothing. Reading everything instead of "changes since" is what
makes deletions visible and a pull after a crash simply finish the job; re-running it
changes nothing. The database is updated in one transaction before the tree is rebuilt
from it, so an interrupted pull leaves a tree the next pull completes.

Disagreements: an annotation marked ground truth decides; otherwise the majority of the
counted annotations; a tie goes to the most recently updated of the tied answers.
Labels the model does not know are kept and reported, never written into the tree.

Labels are checked before they train (labeling.label_check): a new or changed label that
the serving model contradicts, or that annotators disagreed on, goes back to Label Studio
as a review task (data.review_of names the task, data.review_note shows the
disagreement), and trains only once the review is answered, with the reviewer's answer.
The review tasks are found again in Label Studio on every pull, so a pull that crashed
after creating one does not create it twice, and a label is sent back once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from label_studio_sdk import LabelStudio
from PIL import Image

from visionloop.core.capture_store import READER_BUSY_TIMEOUT_S, CaptureStore, image_path
from visionloop.core.db import transaction
from visionloop.labeling.client import unavailable_as_error
from visionloop.labeling.label_check import REVIEW_BELOW, Review, needs_review
from visionloop.labeling.project import (
    FROM_NAME,
    IMAGE_KEY,
    QUEUE_MODEL_VERSION,
    REVIEW_NOTE_KEY,
    Project,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    task_id INTEGER PRIMARY KEY,
    image_sha256 TEXT NOT NULL,
    label TEXT NOT NULL,
    known INTEGER NOT NULL,          -- 1 if the model has this class
    annotations INTEGER NOT NULL,    -- counted (not cancelled) annotations
    agreement REAL NOT NULL,         -- share of them that gave this label
    updated_at TEXT NOT NULL         -- newest counted annotation's update time
);
CREATE TABLE IF NOT EXISTS answers (   -- each counted annotation, for agreement reports
    task_id INTEGER NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL,
    PRIMARY KEY (task_id, annotator)
);
CREATE TABLE IF NOT EXISTS reviews (   -- labels sent back to Label Studio, as it has them
    task_id INTEGER PRIMARY KEY,     -- the task whose label went back
    review_task_id INTEGER NOT NULL,
    first_label TEXT NOT NULL,
    reason TEXT NOT NULL,            -- labeling.label_check.Review.reason
    decided TEXT                     -- the reviewer's answer; NULL while it waits
);
CREATE TABLE IF NOT EXISTS pulls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    finished_at TEXT NOT NULL,
    added INTEGER NOT NULL, changed INTEGER NOT NULL, removed INTEGER NOT NULL,
    unknown INTEGER NOT NULL
);
"""
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
               "WEBP": ".webp"}


@dataclass(frozen=True)
class Label:
    sha: str
    label: str
    known: bool
    annotations: int
    agreement: float
    updated_at: str


@dataclass
class PullResult:
    labelled_tasks: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped_tasks: int = 0  # only cancelled annotations
    foreign_tasks: int = 0  # tasks not made by push (no capture_sha): not ours to train on
    unknown_labels: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)  # known labels in the tree
    sent_for_review: dict[str, int] = field(default_factory=dict)  # this pull, by reason
    waiting_for_review: int = 0  # labels held back until their review is answered
    reviewed: int = 0  # labels decided by a review (they train)


@dataclass(frozen=True)
class ReviewRow:
    task_id: int
    review_task_id: int
    first_label: str
    reason: str
    decided: str | None


def answer(annotation: dict) -> str | None:
    """The class an annotation chose; None if it was skipped or chose nothing."""
    if annotation.get("was_cancelled"):
        return None
    choices = [c for r in annotation.get("result") or [] if r.get("from_name") == FROM_NAME
               for c in (r.get("value") or {}).get("choices") or []]
    return choices[0] if choices else None


def chosen_label(annotations: list[dict]) -> tuple[str, int, float, str] | None:
    """(label, counted annotations, agreement, newest update) by the documented rule."""
    decided = _chosen(annotations)
    return None if decided is None else decided[:4]


def _chosen(annotations: list[dict]) -> tuple[str, int, float, str, bool] | None:
    """chosen_label's tuple and whether a ground-truth annotation decided it."""
    votes = []
    for annotation in annotations:
        choice = answer(annotation)
        if choice is not None:
            votes.append((choice, annotation.get("updated_at") or "",
                          bool(annotation.get("ground_truth"))))
    if not votes:
        return None
    newest = max(v[1] for v in votes)
    ground_truth = [v for v in votes if v[2]]
    if ground_truth:
        label = max(ground_truth, key=lambda v: v[1])[0]
    else:
        counts = Counter(v[0] for v in votes)
        top = max(counts.values())
        tied = {name for name, n in counts.items() if n == top}
        label = max((v for v in votes if v[0] in tied), key=lambda v: v[1])[0]
    agreement = sum(v[0] == label for v in votes) / len(votes)
    return label, len(votes), agreement, newest, bool(ground_truth)


Answer = tuple[int, str, str]  # (task id, annotator, label)


def annotator_names(client: LabelStudio) -> dict[int, str]:
    with unavailable_as_error("listing users"):
        return {u.id: u.email or u.username or f"user {u.id}" for u in client.users.list()}


def task_answers(task_id: int, annotations: list[dict], names: dict[int, str]) -> list[Answer]:
    """One answer per annotator (their newest), for the agreement report."""
    newest: dict[str, tuple[str, str]] = {}
    for annotation in annotations:
        choice = answer(annotation)
        who = annotation.get("completed_by")
        if choice is None or who is None:
            continue
        name = names.get(who, f"user {who}")
        updated = annotation.get("updated_at") or ""
        if name not in newest or updated >= newest[name][1]:
            newest[name] = (choice, updated)
    return [(task_id, name, choice) for name, (choice, _) in newest.items()]


@dataclass
class Remote:
    """What Label Studio has, sorted out: labels that may train, the answers, the review
    tasks' state and the reviews still to create."""
    labels: dict[int, Label] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)  # the tasks' own, not reviews'
    reviews: list[ReviewRow] = field(default_factory=list)
    to_review: list[tuple[object, Label, Review]] = field(default_factory=list)  # (task, ..)


def remote_labels(client: LabelStudio, project: Project, local: dict[int, Label],
                  served: dict[str, list[float]], review_below: float | None
                  ) -> tuple[Remote, PullResult]:
    """Every task's label by the documented rule; a new or changed label that needs review
    (review_below None or 0: only annotators' disagreements do) is held back, as is one
    whose review waits."""
    result, remote = PullResult(), Remote()
    with unavailable_as_error("reading annotations"):
        tasks = list(client.tasks.list(project=project.id, fields="all"))
    names = annotator_names(client)
    review_tasks = {int(t.data["review_of"]): t for t in tasks if "review_of" in (t.data or {})}
    for task in tasks:
        data = task.data or {}
        if "review_of" in data:
            continue
        sha = data.get("capture_sha")
        decided = _chosen(task.annotations or [])
        if decided is None:
            result.skipped_tasks += bool(task.annotations)
            continue
        if sha is None:
            result.foreign_tasks += 1
            continue
        label, count, agreement, updated, ground_truth = decided
        given = Label(sha, label, label in project.classes, count, agreement, updated)
        answers = task_answers(task.id, task.annotations or [], names)
        remote.answers += answers
        review = review_tasks.get(task.id)
        if review is not None:
            verdict = chosen_label(review.annotations or [])
            remote.reviews.append(ReviewRow(task.id, review.id, str(review.data.get(
                "first_answer", label)), str(review.data.get("review_reason", "")),
                verdict[0] if verdict else None))
            if verdict is None:
                result.waiting_for_review += 1
                continue
            result.reviewed += 1
            remote.labels[task.id] = Label(sha, verdict[0], verdict[0] in project.classes,
                                           count + verdict[1], verdict[2], verdict[3])
            continue
        check = None
        if local.get(task.id) != given:
            probs = served.get(sha) if review_below else None
            check = needs_review(label, [a[2] for a in answers], ground_truth,
                                 None if probs is None else np.asarray(probs),
                                 project.classes, review_below or 0.0)
        if check is not None:
            remote.to_review.append((task, given, check))
            result.waiting_for_review += 1
            continue
        remote.labels[task.id] = given
    return remote, result


def review_payload(task: object, given: Label, review: Review) -> dict:
    """The review task: the same image, the disagreement shown, first in the queue (push's
    queue scores are above -push number: labeling.push.queue_score)."""
    data = task.data or {}
    return {"data": {IMAGE_KEY: data[IMAGE_KEY], "capture_image": data.get("capture_image"),
                     "review_of": task.id, "review_sha": given.sha,
                     "first_answer": given.label, "review_reason": review.reason,
                     REVIEW_NOTE_KEY: f"Review: {review.note} Choose what the image shows."},
            "predictions": [{"model_version": QUEUE_MODEL_VERSION, "result": [],
                             "score": -1e9}]}


def send_for_review(client: LabelStudio, project: Project, remote: Remote,
                    result: PullResult) -> None:
    """Create the review tasks; each is found again by the next pull (data.review_of)."""
    if not remote.to_review:
        return
    payloads = [review_payload(task, given, review) for task, given, review in remote.to_review]
    with unavailable_as_error(f"creating {len(payloads)} review tasks"):
        response = client.projects.import_tasks(id=project.id, request=payloads,
                                                 return_task_ids=True)
    for (task, given, review), review_id in zip(remote.to_review, response.task_ids or [],
                                                strict=False):
        remote.reviews.append(ReviewRow(task.id, review_id, given.label, review.reason, None))
        result.sent_for_review[review.reason] = result.sent_for_review.get(review.reason, 0) + 1
    log.info("sent %d labels back for review: %s", len(payloads), result.sent_for_review)


def open_labels_db(labels_dir: Path) -> sqlite3.Connection:
    labels_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(labels_dir / "labels.sqlite3", isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def local_labels(conn: sqlite3.Connection) -> dict[int, Label]:
    rows = conn.execute("SELECT task_id, image_sha256, label, known, annotations, agreement,"
                        " updated_at FROM labels")
    return {r[0]: Label(r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in rows}


def apply(conn: sqlite3.Connection, remote: dict[int, Label], answers: list[Answer],
          reviews: list[ReviewRow], result: PullResult) -> None:
    """Make the labels and answers tables equal to Label Studio's, in one transaction, and
    log the pull."""
    local = local_labels(conn)
    result.added = sum(t not in local for t in remote)
    result.changed = sum(t in local and local[t] != remote[t] for t in remote)
    result.removed = sum(t not in remote for t in local)
    with transaction(conn):
        conn.executemany("DELETE FROM labels WHERE task_id = ?",
                         [(t,) for t in local if t not in remote])
        conn.executemany(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(t, x.sha, x.label, int(x.known), x.annotations, x.agreement, x.updated_at)
             for t, x in remote.items() if local.get(t) != x])
        conn.execute("DELETE FROM answers")
        conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", answers)
        conn.execute("DELETE FROM reviews")
        conn.executemany("INSERT OR REPLACE INTO reviews VALUES (?, ?, ?, ?, ?)",
                         [(r.task_id, r.review_task_id, r.first_label, r.reason, r.decided)
                          for r in reviews])
        conn.execute("INSERT INTO pulls (finished_at, added, changed, removed, unknown)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (datetime.now(timezone.utc).isoformat(timespec="seconds"), result.added,
                      result.changed, result.removed, sum(result.unknown_labels.values())))


def _extension(path: Path) -> str:
    with Image.open(path) as image:
        return _EXTENSIONS.get(image.format or "", ".png")


def _place(source: Path, target: Path) -> None:
    """Hard-link (or copy, across file systems) source to target, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def _prune(tree: Path, wanted: set[Path]) -> None:
    """Remove files not wanted (deleted or changed labels) and emptied class folders."""
    for path in sorted(tree.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def materialize(labels_dir: Path, capture_dir: Path, labels: dict[int, Label]) -> dict[str, int]:
    """Make images/<class>/ hold exactly the known labels (hard links into the capture store)."""
    tree = labels_dir / "images"
    wanted: dict[Path, Path] = {}
    for x in labels.values():
        source = image_path(capture_dir, x.sha)
        if not x.known:
            continue
        if not source.exists():
            log.warning("labelled image %s is missing from the capture store; left out", x.sha)
            continue
        wanted[tree / x.label / f"{x.sha}{_extension(source)}"] = source
    for target, source in wanted.items():
        if not target.exists():
            _place(source, target)
    if tree.exists():
        _prune(tree, set(wanted))
    return dict(Counter(p.parent.name for p in wanted))


def pull(labels_dir: Path, capture_dir: Path, client: LabelStudio, project: Project,
         model: str | None = None, review_below: float | None = REVIEW_BELOW,
         capture_database: str | None = None) -> PullResult:
    """Pull every label, checking the new and changed ones (labeling.label_check):
    review_below None or 0 turns the model's check off, as does `model` None (the model
    whose captures hold the serving probabilities); disagreements always go back."""
    labels_dir, capture_dir = Path(labels_dir), Path(capture_dir)
    conn = open_labels_db(labels_dir)
    try:
        served = (served_probabilities(capture_dir, model, capture_database)
                  if review_below and model else {})
        remote, result = remote_labels(client, project, local_labels(conn), served,
                                       review_below)
        send_for_review(client, project, remote, result)
        result.labelled_tasks = len(remote.labels)
        result.unknown_labels = dict(Counter(x.label for x in remote.labels.values()
                                             if not x.known))
        if result.unknown_labels:
            log.warning("labels the model does not know (kept, not trained on): %s",
                        result.unknown_labels)
        apply(conn, remote.labels, remote.answers, remote.reviews, result)
        result.class_counts = materialize(labels_dir, capture_dir, local_labels(conn))
    finally:
        conn.close()
    return result


def served_probabilities(capture_dir: Path, model: str,
                         capture_database: str | None) -> dict[str, list[float]]:
    store = CaptureStore(capture_dir, busy_timeout_s=READER_BUSY_TIMEOUT_S, url=capture_database)
    try:
        return store.served_probabilities(model)
    finally:
        store.close()


def _query(labels_dir: Path, sql: str) -> list[tuple]:
    """The rows of one query on labels.sqlite3; none before the first pull made it."""
    if not (Path(labels_dir) / "labels.sqlite3").exists():
        return []
    conn = open_labels_db(Path(labels_dir))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def labelled_counts(labels_dir: Path) -> dict[str, int]:
    """Known-class labels pulled so far, per class (push uses them to find minority classes)."""
    return dict(_query(labels_dir, "SELECT label, COUNT(*) FROM labels WHERE known = 1"
                                   " GROUP BY label"))


def annotator_report(labels_dir: Path) -> dict:
    """Per annotator: answers and the share that matches the label pull chose; per pair of
    annotators: tasks both answered and the share they agreed on."""
    rows = _query(labels_dir, "SELECT a.task_id, a.annotator, a.label, l.label FROM answers a"
                              " JOIN labels l ON l.task_id = a.task_id")
    by_task: dict[int, dict[str, str]] = {}
    annotators: dict[str, dict] = {}
    for task_id, who, label, decided in rows:
        by_task.setdefault(task_id, {})[who] = label
        stats = annotators.setdefault(who, {"answers": 0, "agree_with_label": 0})
        stats["answers"] += 1
        stats["agree_with_label"] += label == decided
    for stats in annotators.values():
        stats["agree_with_label"] = round(stats["agree_with_label"] / stats["answers"], 4)
    pairs: dict[str, dict] = {}
    for answers in by_task.values():
        names = sorted(answers)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                pair = pairs.setdefault(f"{first} | {second}", {"shared_tasks": 0, "agreed": 0})
                pair["shared_tasks"] += 1
                pair["agreed"] += answers[first] == answers[second]
    for pair in pairs.values():
        pair["agreement"] = round(pair.pop("agreed") / pair["shared_tasks"], 4)
    return {"labelled_tasks": len(by_task),
            "tasks_with_several_answers": sum(len(a) > 1 for a in by_task.values()),
            "tasks_with_disagreement": sum(len(set(a.values())) > 1 for a in by_task.values()),
            "annotators": annotators, "pairs": pairs}


def review_report(labels_dir: Path) -> dict:
    """Labels sent back for review, as of the last pull: waiting and decided, by reason."""
    rows = _query(labels_dir, "SELECT reason, decided IS NOT NULL, COUNT(*) FROM reviews"
                              " GROUP BY reason, decided IS NOT NULL")
    by_reason: dict[str, int] = {}
    for reason, _, count in rows:
        by_reason[reason] = by_reason.get(reason, 0) + count
    return {"waiting": sum(c for _, done, c in rows if not done),
            "decided": sum(c for _, done, c in rows if done), "by_reason": by_reason}

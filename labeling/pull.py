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
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from label_studio_sdk import LabelStudio
from PIL import Image

from visionloop.core.capture_store import image_path
from visionloop.core.db import transaction
from visionloop.labeling.client import unavailable_as_error
from visionloop.labeling.project import FROM_NAME, Project

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


def answer(annotation: dict) -> str | None:
    """The class an annotation chose; None if it was skipped or chose nothing."""
    if annotation.get("was_cancelled"):
        return None
    choices = [c for r in annotation.get("result") or [] if r.get("from_name") == FROM_NAME
               for c in (r.get("value") or {}).get("choices") or []]
    return choices[0] if choices else None


def chosen_label(annotations: list[dict]) -> tuple[str, int, float, str] | None:
    """(label, counted annotations, agreement, newest update) by the documented rule."""
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
    return label, len(votes), agreement, newest


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


def remote_labels(client: LabelStudio, project: Project
                  ) -> tuple[dict[int, Label], list[Answer], PullResult]:
    result = PullResult()
    labels: dict[int, Label] = {}
    answers: list[Answer] = []
    with unavailable_as_error("reading annotations"):
        tasks = list(client.tasks.list(project=project.id, fields="all"))
    names = annotator_names(client)
    for task in tasks:
        sha = (task.data or {}).get("capture_sha")
        decided = chosen_label(task.annotations or [])
        if decided is None:
            result.skipped_tasks += bool(task.annotations)
            continue
        if sha is None:
            result.foreign_tasks += 1
            continue
        label, count, agreement, updated = decided
        labels[task.id] = Label(sha, label, label in project.classes, count, agreement, updated)
        answers += task_answers(task.id, task.annotations or [], names)
    return labels, answers, result


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
          result: PullResult) -> None:
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
        conn.executemany("INSERT INTO answers VALUES (?, ?, ?)", answers)
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


def pull(labels_dir: Path, capture_dir: Path, client: LabelStudio,
         project: Project) -> PullResult:
    labels_dir, capture_dir = Path(labels_dir), Path(capture_dir)
    remote, answers, result = remote_labels(client, project)
    result.labelled_tasks = len(remote)
    result.unknown_labels = dict(Counter(x.label for x in remote.values() if not x.known))
    if result.unknown_labels:
        log.warning("labels the model does not know (kept, not trained on): %s",
                    result.unknown_labels)
    conn = open_labels_db(labels_dir)
    try:
        apply(conn, remote, answers, result)
        result.class_counts = materialize(labels_dir, capture_dir, local_labels(conn))
    finally:
        conn.close()
    return result


def labelled_counts(labels_dir: Path) -> dict[str, int]:
    """Known-class labels pulled so far, per class (push uses them to find minority classes)."""
    if not (Path(labels_dir) / "labels.sqlite3").exists():
        return {}
    conn = open_labels_db(Path(labels_dir))
    try:
        return dict(conn.execute("SELECT label, COUNT(*) FROM labels WHERE known = 1"
                                 " GROUP BY label").fetchall())
    finally:
        conn.close()


def annotator_report(labels_dir: Path) -> dict:
    """Per annotator: answers and the share that matches the label pull chose; per pair of
    annotators: tasks both answered and the share they agreed on."""
    conn = open_labels_db(Path(labels_dir))
    try:
        rows = conn.execute("SELECT a.task_id, a.annotator, a.label, l.label FROM answers a"
                            " JOIN labels l ON l.task_id = a.task_id").fetchall()
    finally:
        conn.close()
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

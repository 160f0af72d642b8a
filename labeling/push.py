"""`visionloop label push`: choose captured predictions worth labelling and make them tasks.

Reads only the capture store. Each push:
1. reconciles: every task in the project names its image (data.capture_sha); captures of
   that image not yet linked get the task id. This is what makes a push idempotent: an
   import that reached Label Studio but was never recorded here (crash, lost reply) is
   found on the next run instead of being imported twice. Captures linked to a task that
   was deleted in Label Studio are unlinked and can be pushed again;
2. ranks the unlinked captures with a query strategy (labeling.strategies), one per image;
3. walks that order, dropping near-duplicates of images already pushed or chosen;
4. imports the chosen images in chunks, with the model's guess as a prediction, and
   records each task id right after its chunk is accepted. The prediction's score is the
   task's queue position (queue_score): the newest push's rank 1 first, so the task Label
   Studio hands an annotator next is the best-ranked one of the newest ranking.
A chunk that Label Studio did not accept is not recorded; the next push catches up.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from label_studio_sdk import LabelStudio
from PIL import Image

from visionloop.core.capture_store import READER_BUSY_TIMEOUT_S, CaptureStore, image_path
from visionloop.labeling.client import unavailable_as_error
from visionloop.labeling.dedupe import NearDuplicateFilter, thumbnail_signature
from visionloop.labeling.display import display_dir, display_image
from visionloop.labeling.project import (
    FROM_NAME,
    IMAGE_KEY,
    QUEUE_MODEL_VERSION,
    REVIEW_NOTE_KEY,
    TO_NAME,
    Project,
)
from visionloop.labeling.push_options import PushOptions
from visionloop.labeling.strategies import rank

log = logging.getLogger(__name__)

@dataclass
class PushResult:
    replayed_from_spool: int = 0  # rows spooled while the index was down, written by this push
    reconciled: int = 0  # captures linked to tasks that already existed
    unlinked_deleted: int = 0  # captures whose task was deleted in Label Studio: candidates again
    candidates: int = 0  # distinct unlinked images considered
    exact_duplicates: int = 0  # captures of an image already pushed or captured twice
    near_duplicates: int = 0
    pushed: int = 0
    task_ids: list[int] = field(default_factory=list)
    pushed_classes: dict[str, int] = field(default_factory=dict)  # by predicted class


@dataclass(frozen=True)
class Candidate:
    sha: str
    capture_id: int
    model_version: str
    predicted: str
    probabilities: np.ndarray
    scores: dict[str, float]


@dataclass(frozen=True)
class ProjectTasks:
    by_image: dict[str, int]  # image sha256 -> task id, for every task push made
    last_push: int  # the highest push number among them (0: none)


def project_tasks(client: LabelStudio, project: Project) -> ProjectTasks:
    with unavailable_as_error("listing tasks"):
        tasks = [t for t in client.tasks.list(project=project.id)
                 if "capture_sha" in (t.data or {})]
    return ProjectTasks({t.data["capture_sha"]: t.id for t in tasks},
                        max((int(t.data.get("push", 0)) for t in tasks), default=0))


def queue_score(push_number: int, priority: int, pushed: int) -> float:
    """Label Studio hands out the lowest score first: push n's tasks get [-n, -n + 1) in
    their rank order, so a newer push's ranking (the newest model's) comes before what
    is left of older ones."""
    return -push_number + (priority - 1) / pushed


def unlinked_candidates(store: CaptureStore, model: str,
                        n_classes: int, classes: tuple[str, ...]) -> tuple[list[Candidate], int]:
    """The newest capture of each unlinked image, and how many usable captures there were."""
    newest: dict[str, Candidate] = {}
    usable = 0
    for row in store.unlinked(model):
        probabilities = np.asarray(row.probabilities, dtype=np.float64)
        if probabilities.shape != (n_classes,) or row.predicted not in classes:
            log.warning("capture %d has %s probabilities / class %r for a %d-class model; "
                        "left out", row.capture_id, probabilities.shape, row.predicted,
                        n_classes)
            continue
        usable += 1
        newest[row.sha] = Candidate(row.sha, row.capture_id, row.model_version, row.predicted,
                                    probabilities, {"confidence": row.max_prob,
                                                    "margin": row.margin,
                                                    "entropy": row.entropy})
    return list(newest.values()), usable


def file_reference(path: Path, files_root: Path, options: PushOptions) -> str:
    """How Label Studio reaches a file: inline as a data: URI (base64 transport, small
    files) or as a local file under its document root."""
    if options.transport == "base64" and path.stat().st_size <= options.base64_max_bytes:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mime = Image.MIME.get(image.format or "", "application/octet-stream")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    # relative to Label Studio's LOCAL_FILES_DOCUMENT_ROOT (labeling.server: the capture dir)
    relative = path.resolve().relative_to(files_root.resolve())
    return f"/data/local-files/?d={relative.as_posix()}"


def task_images(capture_dir: Path, files_root: Path, sha: str,
                options: PushOptions) -> dict[str, str]:
    """The task's `image` (what the annotator is shown: labeling.display) and
    `capture_image` (the captured original, what the ML backend predicts on)."""
    original = image_path(capture_dir, sha)
    return {IMAGE_KEY: file_reference(display_image(capture_dir, sha), files_root, options),
            "capture_image": file_reference(original, files_root, options)}


def ensure_local_storage(client: LabelStudio, project: Project, capture_dir: Path) -> None:
    """Label Studio serves a local file only inside a storage the project has (never synced:
    tasks are imported by push, with their predictions): the captures and their display
    copies."""
    display_dir(capture_dir).mkdir(parents=True, exist_ok=True)
    wanted = {"captures": str((capture_dir / "images").resolve()),
              "display copies": str(display_dir(capture_dir).resolve())}
    with unavailable_as_error("checking local storage"):
        known = {s.path for s in client.import_storage.local.list(project=project.id)}
        for title, path in wanted.items():
            if path not in known:
                client.import_storage.local.create(project=project.id, path=path, title=title,
                                                   use_blob_urls=False)


def task_payload(candidate: Candidate, priority: int, push_number: int, pushed: int,
                 strategy: str, images: dict[str, str]) -> dict:
    choice = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
              "value": {"choices": [candidate.predicted]}}
    data = {**images, REVIEW_NOTE_KEY: "", "capture_sha": candidate.sha,
            "predicted": candidate.predicted,
            "push": push_number, "priority": priority, "strategy": strategy,
            "model_version": candidate.model_version,
            **{k: round(v, 4) for k, v in candidate.scores.items()}}
    # the model's guess, pre-selected for the annotator; its score orders the queue (the
    # model's confidence is in the task data)
    return {"data": data, "predictions": [{
        "model_version": QUEUE_MODEL_VERSION, "result": [choice],
        "score": queue_score(push_number, priority, pushed)}]}


def choose(candidates: list[Candidate], order: np.ndarray, capture_dir: Path,
           pushed: dict[str, int], options: PushOptions,
           ) -> tuple[list[Candidate], dict[str, str]]:
    """Walk the ranking, skipping near-duplicates; returns the chosen and {dropped: twin}."""
    dedupe = NearDuplicateFilter(options.min_correlation)
    for sha in pushed:
        path = image_path(capture_dir, sha)
        if path.exists():
            dedupe.add_seen(sha, thumbnail_signature(path.read_bytes()))
    chosen, twins = [], {}
    for index in order:
        if len(chosen) >= options.budget:
            break
        candidate = candidates[index]
        try:
            signature = thumbnail_signature(image_path(capture_dir, candidate.sha).read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("capture %d: image unreadable (%s); left out", candidate.capture_id, exc)
            continue
        twin = dedupe.offer(candidate.sha, signature)
        if twin is None:
            chosen.append(candidate)
        else:
            twins[candidate.sha] = twin
    return chosen, twins


def push(capture_dir: Path, client: LabelStudio, project: Project, model: str,
         minority: list[str], options: PushOptions,
         on_chunk: Callable[[int], None] | None = None,
         files_root: Path | None = None, capture_database: str | None = None) -> PushResult:
    """Push up to options.budget new tasks; see the module docstring for the steps.

    files_root: Label Studio's local-files document root, when it is not the capture dir.
    capture_database: the capture index's URL (core.capture_store.database_url).
    """
    capture_dir = Path(capture_dir)
    files_root = Path(files_root) if files_root is not None else capture_dir
    store = CaptureStore(capture_dir, busy_timeout_s=READER_BUSY_TIMEOUT_S, url=capture_database)
    try:
        result = PushResult()
        # captures spooled during an outage of the index, when no serving write came since
        result.replayed_from_spool = store.replay_spool()
        existing = project_tasks(client, project)
        result.unlinked_deleted = store.unlink_tasks_not_in(set(existing.by_image.values()),
                                                            model)
        # new captures of images that already are tasks become those tasks
        result.exact_duplicates = store.link(store.pushed_tasks(model), model)
        # tasks Label Studio has but we never recorded (a crash after an import)
        result.reconciled = store.link(existing.by_image, model)
        pushed = store.pushed_tasks(model)
        candidates, usable = unlinked_candidates(store, model, len(project.classes),
                                                 project.classes)
        result.exact_duplicates += usable - len(candidates)  # one image captured twice
        result.candidates = len(candidates)
        if not candidates or options.budget == 0:
            return result
        probs = np.stack([c.probabilities for c in candidates])
        minority_idx = [project.classes.index(c) for c in minority if c in project.classes]
        order = rank(probs, options.strategy, budget=options.budget, minority=minority_idx,
                     minority_share=options.minority_share, seed=options.seed)
        chosen, twins = choose(candidates, order, capture_dir, pushed, options)
        result.near_duplicates = len(twins)
        if options.transport == "local-files" or any(
                image_path(capture_dir, c.sha).stat().st_size > options.base64_max_bytes
                for c in chosen):
            ensure_local_storage(client, project, capture_dir)
        for start in range(0, len(chosen), options.chunk_size):
            chunk = chosen[start:start + options.chunk_size]
            tasks = [task_payload(c, start + i + 1, existing.last_push + 1, len(chosen),
                                  options.strategy,
                                  task_images(capture_dir, files_root, c.sha, options))
                     for i, c in enumerate(chunk)]
            with unavailable_as_error(f"importing tasks {start + 1}-{start + len(chunk)}"):
                response = client.projects.import_tasks(id=project.id, request=tasks,
                                                         return_task_ids=True)
            ids = list(response.task_ids or [])
            if len(ids) != len(chunk):
                raise RuntimeError(f"Label Studio returned {len(ids)} task ids for "
                                   f"{len(chunk)} tasks; the next push reconciles them")
            links = {c.sha: task for c, task in zip(chunk, ids, strict=True)}
            store.link(links, model)
            result.pushed += len(chunk)
            result.task_ids += ids
            for c in chunk:
                result.pushed_classes[c.predicted] = result.pushed_classes.get(c.predicted, 0) + 1
            if on_chunk is not None:
                on_chunk(result.pushed)
        # a near-duplicate becomes its twin's task: one label covers both
        known = store.pushed_tasks(model)
        store.link({sha: known[twin] for sha, twin in twins.items() if twin in known}, model)
        return result
    finally:
        store.close()

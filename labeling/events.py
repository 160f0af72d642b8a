"""Annotation events from Label Studio's webhooks: count them, trigger retraining past a
threshold, or at once on Label Studio's "Start Training" (START_TRAINING). Calls refused
for a missing or wrong secret are counted here too.

The count lives in a small JSON file so a restart of the receiver forgets nothing. The
retraining command runs in a background thread, never inside the webhook request (Label
Studio waits on webhooks synchronously, with a 1 s timeout, when it has no Redis), and
only one run at a time.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from pathlib import Path

from visionloop.core.fsutil import atomic_write_json

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                     "ANNOTATION_DELETED")
START_TRAINING = "START_TRAINING"  # the "Start Training" button, POST /api/ml/<id>/train


class RetrainTrigger:
    def __init__(self, state_file: Path, threshold: int, command: list[str] | None,
                 log_file: Path | None = None) -> None:
        self.state_file, self.threshold, self.command = Path(state_file), threshold, command
        self.log_file = log_file or self.state_file.with_suffix(".retrain.log")
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self.state = self._load()

    def _load(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"events": {}, "since_trigger": 0, "triggers": 0, "last_exit_code": None,
                "unauthorised": {}}

    def refuse(self, route: str) -> None:
        """Count a call refused for its credentials (it triggers nothing)."""
        with self._lock:
            refused = self.state.setdefault("unauthorised", {})
            refused[route] = refused.get(route, 0) + 1
            atomic_write_json(self.state_file, self.state)

    def record(self, action: str) -> bool:
        """Count one event; True if it started a retrain: START_TRAINING starts one at once,
        annotation events once `threshold` of them have arrived."""
        with self._lock:
            self.state["events"][action] = self.state["events"].get(action, 0) + 1
            if action != START_TRAINING:
                self.state["since_trigger"] += 1
            due = action == START_TRAINING or self.state["since_trigger"] >= self.threshold
            start = (self.command is not None and due
                     and (self._running is None or not self._running.is_alive()))
            if start:
                self.state["since_trigger"] = 0
                self.state["triggers"] += 1
                self._running = threading.Thread(target=self._run, name="retrain", daemon=True)
            atomic_write_json(self.state_file, self.state)
        if start:
            self._running.start()
        return start

    def _run(self) -> None:
        log.info("starting the retrain command %s", self.command)
        with open(self.log_file, "ab") as out:
            code = subprocess.run(self.command, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, check=False).returncode
        with self._lock:
            self.state["last_exit_code"] = code
            atomic_write_json(self.state_file, self.state)
        log.info("retrain command exited %d", code)

    def wait(self, timeout: float | None = None) -> None:
        if self._running is not None:
            self._running.join(timeout)

"""Which version is the champion, and every retraining decision in a log a person can read.

    model_store/<name>/CHAMPION       the version serving now (one line)
    model_store/<name>/registry.md    one table row per decision, appended
    model_store/<name>/registry.jsonl the same decisions with every metric, for programs
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from visionloop.core.fsutil import atomic_write_text
from visionloop.core.lock import FileLock
from visionloop.core.model_store import ModelStore

_HEADER = ("| time (UTC) | champion | challenger | new labels | macro-F1 champion -> challenger "
           "| minority recall champion -> challenger | decision | reason |\n"
           "|---|---|---|---|---|---|---|---|\n")


@dataclass
class Decision:
    time: str
    champion: str
    challenger: str | None
    new_labels: int
    promoted: bool
    reason: str
    champion_metrics: dict = field(default_factory=dict)
    challenger_metrics: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)  # split, images, rule and the paired intervals


def resolve(store: ModelStore, name: str, version: str) -> str:
    """'champion' -> the recorded champion; 'latest' or vN as the store resolves them."""
    if version == "champion":
        return Registry(store, name).champion()
    return store.resolve_version(name, version)


class Registry:
    def __init__(self, store: ModelStore, name: str) -> None:
        self.store, self.name = store, name
        self.dir = store.model_dir(name)

    def writer_lock(self) -> FileLock:
        """Held by whoever may change the champion: a retrain run or `visionloop promote`
        (a manual promotion in the middle of a retrain would be undone by it)."""
        return FileLock(self.dir / ".retrain.lock")

    def champion(self) -> str:
        """The recorded champion; before anything was recorded, the newest version."""
        path = self.dir / "CHAMPION"
        if path.exists():
            return path.read_text().strip()
        return self.store.resolve_version(self.name, "latest")

    def set_champion(self, version: str) -> None:
        self.store.version_dir(self.name, version)  # validates the name
        atomic_write_text(self.dir / "CHAMPION", version + "\n")

    def append(self, decision: Decision) -> None:
        markdown = self.dir / "registry.md"
        if not markdown.exists():
            markdown.write_text(f"# Retraining decisions for {self.name}\n\n" + _HEADER)
        c, n = decision.champion_metrics, decision.challenger_metrics

        def pair(key: str) -> str:
            return (f"{c[key]:.4f} -> {n[key]:.4f}" if key in c and key in n else "-")

        with open(markdown, "a") as f:
            f.write(f"| {decision.time} | {decision.champion} | {decision.challenger or '-'} | "
                    f"{decision.new_labels} | {pair('macro_f1')} | {pair('minority_recall')} | "
                    f"{'promoted' if decision.promoted else 'kept champion'} | "
                    f"{decision.reason} |\n")
        with open(self.dir / "registry.jsonl", "a") as f:
            f.write(json.dumps(asdict(decision), sort_keys=True) + "\n")

    def decisions(self) -> list[Decision]:
        path = self.dir / "registry.jsonl"
        if not path.exists():
            return []
        return [Decision(**json.loads(line)) for line in path.read_text().splitlines() if line]

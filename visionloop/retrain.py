"""`visionloop retrain`: the scheduled job that closes the loop.

    lock -> pull labels -> enough new ones? -> train a challenger from the champion on
    base data + labels (by default its head re-fit on cached embeddings) -> score both on
    the gate split (val/) through the served path -> gate -> promote or keep

The gate (visionloop.gate): the challenger is promoted only if the paired bootstrap
interval of its difference to the champion rules out a macro-F1 drop larger than
`max_macro_f1_drop` AND a minority-recall drop larger than `max_minority_recall_drop`.
Every decision, with its intervals and the rule, is appended to the registry
(core.registry). Promotion (package, zero-downtime swap in a running
TorchServe, then the CHAMPION record) is the last step, so a failure or a kill anywhere
before it leaves the champion serving; the trainer publishes a version only after its
export parity checks pass, and labels are never modified here. A crashed run's lock is
released by the kernel; its staging directories are removed by the next run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from visionloop.configs import RetrainConfig
from visionloop.core.drift import latest_readings
from visionloop.core.errors import InputError
from visionloop.core.failpoints import failpoint
from visionloop.core.manifest import ModelManifest
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Decision, Registry
from visionloop.core.trained_labels import label_files, labels_already_used, record_labels_used
from visionloop.gate import GateRule, decide
from visionloop.labeling.client import connect
from visionloop.labeling.project import default_title, ensure_project
from visionloop.labeling.pull import pull
from visionloop.labeling.server import LabelStudioConfig
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.capture import capture_policy
from visionloop.serving.handler import ServingConfig
from visionloop.serving.offline import InProcessModel
from visionloop.serving.promote import (
    RolloutIncomplete,
    describe,
    promote,
    roll_out,
    serving_versions,
)
from visionloop.serving.server import ServerConfig
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.metrics import classification_report, expected_calibration_error
from visionloop.trainer.splits import load_splits
from visionloop.trainer.train import run_training

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    macro_f1: float
    minority_recall: float
    accuracy: float
    ece: float
    per_class_recall: dict[str, float]


def held_out_samples(data: Path, classes: tuple[str, ...], per_class: int | None,
                     split: str = "test") -> list[tuple[Path, int]]:
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (data / split / name).iterdir() if p.is_file())
        samples += [(p, label) for p in files[:per_class]]
    return samples


def evaluate(version_dir: Path, samples: list[tuple[Path, int]],
             minority: list[str]) -> tuple[Evaluation, np.ndarray]:
    """Served-path predictions (TorchScript artifact, handler functions) on held-out images:
    the metrics, and the predicted class of each image (for paired comparisons)."""
    model = InProcessModel(version_dir)
    replies = model.predict([p.read_bytes() for p, _ in samples])
    probs = torch.tensor([r.probabilities for r in replies], dtype=torch.float64)
    labels = torch.tensor([y for _, y in samples])
    report = classification_report(probs.clamp_min(1e-12).log(), labels, model.manifest.classes)
    recall = {c: report["per_class"][c]["recall"] for c in model.manifest.classes}
    evaluation = Evaluation(macro_f1=report["macro_f1"], accuracy=report["accuracy"],
                            minority_recall=(sum(recall[c] for c in minority) / len(minority)
                                             if minority else math.nan),
                            ece=expected_calibration_error(probs.float(), labels),
                            per_class_recall=recall)
    return evaluation, probs.argmax(dim=1).numpy()


def gate(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray,
         classes: tuple[str, ...], minority: list[str],
         cfg: RetrainConfig) -> tuple[bool, str, dict]:
    rule = GateRule(cfg.max_macro_f1_drop, cfg.max_minority_recall_drop)
    return decide(labels, champion, challenger, len(classes),
                  [classes.index(c) for c in minority], rule, seed=cfg.seed)


def challenger_learner(cfg: RetrainConfig, champion: ModelManifest,
                       new_labels: int) -> tuple[str, str]:
    """(the trainer's learner for the challenger, why): `champion` keeps the champion's
    backbone and re-fits its head, unless the training set has grown enough since the
    champion's learner was chosen for the choice to be made again."""
    if cfg.learner != "champion":
        return cfg.learner, f"--learner {cfg.learner}"
    selection = champion.metrics.get("selection")
    if selection:
        images = sum(champion.train_counts.values()) + new_labels
        grown = images / selection["train_images"] - 1
        if grown >= cfg.reselect_growth:
            return "auto", (f"the training set grew by {grown:.0%} since the learner was "
                            f"chosen (>= {cfg.reselect_growth:.0%}): choosing again")
    kind = champion.metrics.get("learner", champion.training_config.get("learner", "head"))
    return "head", f"the champion's ({kind}) backbone kept, its head re-fit"


def champion_data(cfg: RetrainConfig, champion: ModelManifest) -> TrainConfig:
    """The data settings the challenger trains and the gate scores on: --data, else the
    champion's own data folder, with the champion's split settings, so that a split made from
    class folders is the champion's split again."""
    trained = champion.training_config
    data = cfg.data or trained.get("data")
    if not data:
        raise InputError(f"the champion {champion.version} records no data folder",
                         hint="pass --data FOLDER (what it was trained on)")
    kept = {k: trained[k] for k in ("split_seed", "val_fraction", "test_fraction", "on_corrupt")
            if k in trained}
    return TrainConfig(data=str(data), **kept)


def gate_samples(cfg: RetrainConfig, champion: ModelManifest) -> list[tuple[Path, int]]:
    """The gate's images: the val split of the champion's data (at most eval_per_class per
    class). Read before anything else happens, so bad data changes nothing."""
    splits = load_splits(champion_data(cfg, champion), champion.classes)
    made = champion.metrics.get("splits_made")
    if splits.made and made and splits.made["val_sha256"] != made["val_sha256"]:
        log.warning("the data folder changed since %s was trained: its val split is not the "
                    "one the champion was chosen on", champion.version)
    kept: dict[int, int] = {}
    samples = []
    for path, label in splits.val:
        kept[label] = kept.get(label, 0) + 1
        if cfg.eval_per_class is None or kept[label] <= cfg.eval_per_class:
            samples.append((path, label))
    return samples


def train_challenger(cfg: RetrainConfig, champion: ModelManifest, minority: list[str],
                     learner: str) -> Path:
    labels = Path(cfg.labels_dir) / "images"
    train_cfg = replace(
        champion_data(cfg, champion), extra_train=(str(labels),) if labels.is_dir() else (),
        out=str(cfg.store), name=cfg.name, parent=champion.version, learner=learner,
        budget_s=cfg.budget_s,
        embedding_cache=str(cfg.embedding_cache), epochs=cfg.epochs,
        freeze_epochs=cfg.freeze_epochs, lr=cfg.lr, base_per_class=cfg.base_per_class,
        test_per_class=cfg.eval_per_class,
        minority=tuple(minority), seed=cfg.seed, show_progress=False,
        work_dir=str(Path(cfg.work_dir) / "checkpoints"))
    version_dir = run_training(train_cfg)
    if version_dir is None:
        raise RuntimeError("training published no version")
    return version_dir


Replicas = ServerConfig | list[ServerConfig] | None  # one TorchServe, several, or none


def _replicas(torchserve: Replicas) -> list[ServerConfig]:
    if torchserve is None:
        return []
    return [torchserve] if isinstance(torchserve, ServerConfig) else list(torchserve)


def promote_version(cfg: RetrainConfig, version: str, torchserve: Replicas) -> str:
    """Package once (into the model store the replicas share) and roll the version through
    every TorchServe replica; returns what was done. Raises RolloutIncomplete when some
    replica is down or fails (with none reachable, nothing runs to be swapped)."""
    replicas = _replicas(torchserve)
    if not any(server.management_reachable(r) for r in replicas):
        return "no TorchServe running: recorded as champion only"
    store = ModelStore(cfg.store)
    manifest = store.load_manifest(cfg.name, version)
    serving = ServingConfig(capture=capture_policy(
        manifest, max_confidence=cfg.capture_below, per_minute=cfg.capture_per_minute))
    mar = package(store.version_dir(cfg.name, version), replicas[0].model_store, cfg.backend,
                  serving=serving)
    if len(replicas) == 1:
        removed = promote(replicas[0], cfg.name, version, mar.name)
        return (f"TorchServe now serves {version}"
                + (f" ({', '.join(removed)} unregistered)" if removed else ""))
    seconds = roll_out(replicas, cfg.name, version, mar.name)
    return (f"{len(replicas)} TorchServe replicas now serve {version} ("
            + ", ".join(f"{url} {s:.1f} s" for url, s in seconds.items()) + ")")


def restore_champion_serving(cfg: RetrainConfig, torchserve: Replicas, champion: str) -> bool:
    """A run killed during a promotion, or a rollout stopped by a replica that was down,
    can leave replicas serving the challenger, or two versions: make the CHAMPION record's
    version the only one served on every replica that answers. True if it had to. The
    record is written last, so it names the last promotion that completed everywhere."""
    replicas = _replicas(torchserve)
    serving = serving_versions(replicas, cfg.name)
    stray = {r.url("management"): r for r in replicas
             if serving[r.url("management")] not in (None, [], [champion])}
    if not stray:
        return False
    log.warning("TorchServe replicas serve %s but the champion is %s (a promotion was "
                "interrupted): restoring it on %s", describe(serving), champion, list(stray))
    promote_version(cfg, champion, list(stray.values()))
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def retrain_once(cfg: RetrainConfig, labelstudio: LabelStudioConfig | None = None,
                 torchserve: Replicas = None) -> Decision | None:
    """One run of the job; None when there were too few new labels to bother.

    A promotion that could not reach every replica is recorded as not promoted (the
    champion record stays) and RolloutIncomplete is raised after the record is written."""
    store = ModelStore(cfg.store)
    registry = Registry(store, cfg.name)
    with registry.writer_lock():
        champion = registry.champion()
        manifest = store.load_manifest(cfg.name, champion)
        samples = gate_samples(cfg, manifest)  # bad data stops here, before any change
        if store.discard_all_staging(cfg.name):
            log.info("removed staging directories left by an interrupted run")
        restore_champion_serving(cfg, torchserve, champion)
        if cfg.pull and labelstudio is not None:
            pull_labels(cfg, labelstudio)
        current = label_files(cfg.labels_dir)
        new = current - labels_already_used(store, cfg.name)
        needed = cfg.min_new_labels
        if cfg.drift_trigger and traffic_drifted(cfg):
            needed = 1  # the traffic moved: fold in what labels there are now
            log.info("the served traffic has drifted: retraining on any new label")
        if len(new) < needed:
            log.info("%d new labels (< %d): nothing to do", len(new), needed)
            return None
        # pin it before a challenger is published: "newest version" would point at that
        registry.set_champion(champion)
        manifest.verify(store.version_dir(cfg.name, champion))  # before an hour of training
        minority = list(manifest.minority_classes)
        learner, why = challenger_learner(cfg, manifest, len(new))
        log.info("%d new labels: a challenger from %s by the %s learner (%s)", len(new),
                 champion, learner, why)
        challenger_dir = train_challenger(cfg, manifest, minority, learner)
        record_labels_used(store, cfg.name, current)
        champion_eval, champion_pred = evaluate(store.version_dir(cfg.name, champion), samples,
                                                minority)
        challenger_eval, challenger_pred = evaluate(challenger_dir, samples, minority)
        promoted, reason, evidence = gate(np.array([y for _, y in samples]), champion_pred,
                                          challenger_pred, manifest.classes, minority, cfg)
        stopped = None
        if promoted:
            try:
                reason += "; " + promote_version(cfg, challenger_dir.name, torchserve)
                failpoint("retrain.served")
                registry.set_champion(challenger_dir.name)
            except RolloutIncomplete as exc:
                stopped, promoted = exc, False
                reason += f"; {exc}; the champion stays {champion} (the next run puts every " \
                          "replica back on it)"
        decision = Decision(time=_now(), champion=champion, challenger=challenger_dir.name,
                            new_labels=len(new), promoted=promoted, reason=reason,
                            champion_metrics=asdict(champion_eval),
                            challenger_metrics=asdict(challenger_eval),
                            gate={"split": "val/", **evidence})
        registry.append(decision)
        log.info("%s %s: %s", challenger_dir.name,
                 "promoted" if promoted else "not promoted", reason)
        if stopped is not None:
            raise stopped
        return decision


def traffic_drifted(cfg: RetrainConfig) -> bool:
    """Whether a serving worker's latest reading (core.drift, written beside the captures
    within the last hour) says the traffic drifted."""
    return any(r["drifted"] for r in latest_readings(cfg.capture_dir, cfg.name))


def pull_labels(cfg: RetrainConfig, labelstudio: LabelStudioConfig) -> None:
    store = ModelStore(cfg.store)
    manifest = store.load_manifest(cfg.name, Registry(store, cfg.name).champion())
    client = connect(labelstudio)
    project = ensure_project(client, cfg.project or default_title(cfg.name), manifest.classes)
    result = pull(cfg.labels_dir, cfg.capture_dir, client, project, model=cfg.name,
                  review_below=cfg.review_below or None, capture_database=cfg.capture_database)
    log.info("pulled: %d labelled tasks (+%d, ~%d, -%d); %d waiting for review, %d sent now",
             result.labelled_tasks, result.added, result.changed, result.removed,
             result.waiting_for_review, sum(result.sent_for_review.values()))

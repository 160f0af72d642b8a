"""One training job end to end: data -> model -> epochs -> calibration -> export -> manifest.

Each step is a function; `run_training` only calls them in order. Under torchrun every
rank trains its shard; rank 0 alone evaluates, checkpoints, exports and publishes.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from visionloop.core.bootstrap import paired_difference
from visionloop.core.classes import minority_classes
from visionloop.core.drift import fit_reference
from visionloop.core.errors import InputError
from visionloop.core.fsutil import sha256_file
from visionloop.core.manifest import Artifact, ModelManifest, Preprocessing
from visionloop.core.model_store import ModelStore, StoreError
from visionloop.core.preprocess import preprocess_image
from visionloop.trainer import imbalance
from visionloop.trainer.augment import TrainTransform
from visionloop.trainer.calibration import calibrated_probabilities, fit_temperature
from visionloop.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visionloop.trainer.config import CANDIDATES, PREFERENCE, TrainConfig
from visionloop.trainer.data import (
    DataError,
    ImageListDataset,
    loader_workers,
)
from visionloop.trainer.distributed import DistContext, init_distributed, shutdown
from visionloop.trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from visionloop.trainer.engine import predict_logits, train_one_epoch
from visionloop.trainer.export import export_all
from visionloop.trainer.head import L2_GRID, fit_head, logits_of, no_stronger_than, set_head
from visionloop.trainer.metrics import (
    classification_report,
    expected_calibration_error,
    minority_recall,
    reliability_table,
)
from visionloop.trainer.models import build_model, set_backbone_trainable
from visionloop.trainer.optim import build_optimizer, build_scheduler, parameter_groups
from visionloop.trainer.report import write_report
from visionloop.trainer.sampling import EpochSampler
from visionloop.trainer.selection import (
    CandidateScore,
    choose,
    estimated_seconds,
    seconds_per_image,
)
from visionloop.trainer.splits import Splits, load_splits

log = logging.getLogger(__name__)

PARITY_BATCH = 16  # real test images used to verify each export


@dataclass
class StartingPoint:
    model: nn.Module
    head_prefix: str
    preprocessing: Preprocessing
    arch: str
    parent_version: str | None
    # a model another learner already fit (LP-FT's probe): scored on val/ before the first
    # epoch, so the fine-tune keeps it unless an epoch does better
    fitted: bool = False


@dataclass
class Trained:
    """One learner's outcome: the model (in start), its metrics and its val/ logits."""
    cfg: TrainConfig
    start: StartingPoint
    metrics: dict
    val_logits: torch.Tensor
    test_logits: torch.Tensor
    loaders: tuple[DataLoader, DataLoader, DataLoader]


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_val_f1: float
    history: list[dict]


def prepare_model(cfg: TrainConfig, classes: tuple[str, ...], store: ModelStore,
                  parent: ModelManifest | None) -> StartingPoint:
    """Fresh pretrained backbone + new head, or a warm start from the parent version."""
    if parent is None:
        built = build_model(cfg.arch, len(classes), cfg.weights)
        pre = Preprocessing(cfg.image_size, cfg.resize, built.mean, built.std)
        return StartingPoint(built.model, built.head_prefix, pre, cfg.arch, None)
    version = parent.version
    if tuple(parent.classes) != tuple(classes):
        raise DataError(f"the data's classes {list(classes)} differ from parent {version}'s "
                        f"{list(parent.classes)}; a warm start needs the same class set")
    built = build_model(parent.arch, len(classes), "none")
    weights = parent.artifact_path(store.version_dir(cfg.name, version), "state_dict")
    built.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    log.info("warm start from %s/%s (%s)", cfg.name, version, parent.arch)
    return StartingPoint(built.model, built.head_prefix, parent.preprocessing, parent.arch, version)


def make_loaders(cfg: TrainConfig, splits: Splits, pre: Preprocessing,
                 ctx: DistContext) -> tuple[DataLoader, DataLoader, DataLoader]:
    weights = None
    if cfg.imbalance == "oversample":
        weights = imbalance.oversampling_weights([y for _, y in splits.train], splits.train_counts)
    sampler = EpochSampler(len(splits.train), cfg.seed, weights, ctx.rank, ctx.world_size)
    common = {**loader_workers(cfg.num_workers), "persistent_workers": cfg.num_workers > 0,
              "pin_memory": ctx.device.type == "cuda"}
    # drop_last: a ragged last batch of one image breaks BatchNorm in train mode.
    train = DataLoader(ImageListDataset(splits.train, TrainTransform(pre, cfg.augment)),
                       batch_size=cfg.batch_size, sampler=sampler,
                       drop_last=len(sampler) > cfg.batch_size, **common)
    evaluate = partial(preprocess_image, pre=pre)
    val, test = (DataLoader(ImageListDataset(samples, evaluate), batch_size=cfg.batch_size * 2,
                            **common) for samples in (splits.val, splits.test))
    return train, val, test


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Fitter:
    """The epoch loop with early stopping on val macro-F1, checkpoints and resume."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, start: StartingPoint, splits: Splits,
                 loaders: tuple[DataLoader, DataLoader, DataLoader]) -> None:
        self.cfg, self.ctx, self.start, self.splits = cfg, ctx, start, splits
        self.train_loader, self.val_loader, _ = loaders
        self.model = start.model.to(ctx.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = imbalance.build_loss(cfg.imbalance, splits.train_counts,
                                            cfg.label_smoothing).to(ctx.device)
        groups = parameter_groups(self.model, start.head_prefix, cfg.lr, cfg.backbone_lr_scale,
                                  cfg.weight_decay)
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.lr)
        steps = cfg.epochs * len(self.train_loader)
        warmup = round(cfg.warmup_epochs * len(self.train_loader))
        self.scheduler = build_scheduler(self.optimizer, steps, warmup, cfg.schedule)
        self.result = FitResult(_cpu_state(self.model), -1.0, [])
        self.first_epoch = 0

    @property
    def last_path(self) -> Path:
        return self.cfg.checkpoint_dir / "last.pt"

    def resume(self) -> None:
        state, meta = load_checkpoint(self.last_path)
        if meta["fingerprint"] != self.splits.fingerprint:
            raise CheckpointError(f"{self.last_path} was written for other data; "
                                  "remove it or drop --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.result = FitResult(state["best_model"], meta["best_val_f1"], meta["history"])
        self.first_epoch = meta["epoch"] + 1
        log.info("resumed from %s after epoch %d", self.last_path, meta["epoch"])

    def checkpoint(self, epoch: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "best_model": self.result.best_state}
        meta = {"epoch": epoch, "best_val_f1": self.result.best_val_f1,
                "history": self.result.history, "fingerprint": self.splits.fingerprint,
                "config": self.cfg.to_dict()}
        save_checkpoint(self.last_path, state, meta)

    def evaluate_epoch(self, epoch: int, stats: dict, started: float) -> bool:
        """Rank 0: score val, keep the best weights, checkpoint; True means stop early."""
        val_f1 = self.val_macro_f1()
        if val_f1 > self.result.best_val_f1:
            self.result.best_val_f1, self.result.best_state = val_f1, _cpu_state(self.model)
        self.result.history.append({"epoch": epoch, **stats, "val_macro_f1": val_f1})
        self.checkpoint(epoch)
        done = epoch + 1 - self.first_epoch
        eta = (time.perf_counter() - started) / done * (self.cfg.epochs - epoch - 1)
        log.info("epoch %d/%d: loss %.4f, %.0f img/s, val macro-F1 %.4f (best %.4f), ETA %.0fs",
                 epoch + 1, self.cfg.epochs, stats["loss"], stats["images_per_s"], val_f1,
                 self.result.best_val_f1, eta)
        best_epoch = max(self.result.history, key=lambda h: h["val_macro_f1"])["epoch"]
        return epoch - best_epoch >= self.cfg.early_stop_patience

    def val_macro_f1(self) -> float:
        logits, labels = predict_logits(self.model, self.val_loader, self.ctx.device,
                                        amp=self.cfg.amp, channels_last=self.cfg.channels_last)
        return classification_report(logits, labels, self.splits.classes)["macro_f1"]

    def score_start(self) -> None:
        self.result.best_val_f1 = self.val_macro_f1()
        self.result.history.append({"epoch": -1, "val_macro_f1": self.result.best_val_f1})
        log.info("the start's val macro-F1: %.4f", self.result.best_val_f1)

    def fit(self) -> FitResult:
        started, trainer_model, frozen = time.perf_counter(), None, None
        if self.start.fitted and self.first_epoch == 0 and self.ctx.is_main:
            self.score_start()
        for epoch in range(self.first_epoch, self.cfg.epochs):
            if frozen != (epoch < self.cfg.freeze_epochs) or trainer_model is None:
                frozen = epoch < self.cfg.freeze_epochs
                set_backbone_trainable(self.model, self.start.head_prefix, not frozen,
                                       self.cfg.tune, self.cfg.last_blocks)
                trainer_model = self.ctx.wrap(self.model)  # DDP must see the new trainable set
            self.train_loader.sampler.set_epoch(epoch)
            phase = " (head only)" if frozen else ""
            stats = train_one_epoch(
                trainer_model, self.train_loader, self.loss_fn, self.optimizer, self.scheduler,
                self.ctx.device, amp=self.cfg.amp, channels_last=self.cfg.channels_last,
                description=f"epoch {epoch + 1}/{self.cfg.epochs}{phase}",
                show_progress=self.cfg.show_progress and self.ctx.is_main,
                freeze_all_norm_statistics=self.cfg.tune != "all")
            stop = self.evaluate_epoch(epoch, stats, started) if self.ctx.is_main else False
            if self.ctx.broadcast_flag(stop):
                log.info("early stop: no better val macro-F1 for %d epochs",
                         self.cfg.early_stop_patience)
                break
        return self.result


def evaluate_and_calibrate(model: nn.Module, val_loader: DataLoader, test_loader: DataLoader,
                           splits: Splits, minority: list[str],
                           ctx: DistContext) -> tuple[dict, torch.Tensor, torch.Tensor]:
    val_logits, val_labels = predict_logits(model, val_loader, ctx.device)
    test_logits, test_labels = predict_logits(model, test_loader, ctx.device)
    return metrics_from_logits(val_logits, val_labels, test_logits, test_labels, splits,
                               minority), val_logits, test_logits


def metrics_from_logits(val_logits: torch.Tensor, val_labels: torch.Tensor,
                        test_logits: torch.Tensor, test_labels: torch.Tensor, splits: Splits,
                        minority: list[str]) -> dict:
    temperature = fit_temperature(val_logits, val_labels)
    report = classification_report(test_logits, test_labels, splits.classes)
    uncalibrated = calibrated_probabilities(test_logits, 1.0)
    calibrated = calibrated_probabilities(test_logits, temperature)
    return {
        "test": report, "test_split": splits.test_split,
        "calibration_split": splits.calibration_split, "temperature": temperature,
        **({"splits_made": splits.made} if splits.made else {}),
        "minority": minority, "minority_recall": minority_recall(report, minority),
        # labeling reads these to know which classes still lack labelled examples
        "train_counts": dict(zip(splits.classes, splits.train_counts, strict=True)),
        "ece_uncalibrated": expected_calibration_error(uncalibrated, test_labels),
        "ece_calibrated": expected_calibration_error(calibrated, test_labels),
        "reliability_uncalibrated": reliability_table(uncalibrated, test_labels),
        "reliability_calibrated": reliability_table(calibrated, test_labels),
    }


def head_prior(parent: ModelManifest | None, splits: Splits) -> list[int]:
    """The logit-adjustment prior: a warm start keeps its parent's (so labels the loop found
    for a rare class add evidence without shrinking its adjustment); else this train set's."""
    if parent is not None and parent.metrics.get("prior_counts"):
        return [int(parent.metrics["prior_counts"][c]) for c in splits.classes]
    if parent is not None and parent.train_counts:
        return [int(parent.train_counts[c]) for c in splits.classes]
    return list(splits.train_counts)


def head_strengths(cfg: TrainConfig, parent: ModelManifest | None) -> tuple[float, ...] | None:
    """The head's L2 strengths to try on val/: the configured one; else a warm start tries
    its parent's and the weaker ones of the grid, the parent's winning a tie; else None
    (all of L2_GRID, for a champion).

    Not stronger: a retrain has more labels, never fewer. Not only the parent's either:
    the 96 px champion chose 0.1 over 0.03 on a val/ tie (macro-F1 0.8354 against 0.8337),
    and with 0.1 kept the loop's 300 labels lowered val/ macro-F1 to 0.8284, so no
    challenger passed the gate; at 0.03 the same labels give val/ 0.8373 and test/ 0.859
    against 0.846 (bench/results/head-l2-after-loop-96px.md). Not the whole grid: a tie
    between a stronger and a weaker value flips either way from one retrain to the next,
    and moved a random-label retrain's test/ minority recall by +0.08 without one new
    minority label (0.699 against 0.732 at tied val/ macro-F1 0.785 and 0.783)."""
    if cfg.head_l2 is not None:
        return (cfg.head_l2,)
    if parent is not None and "l2" in parent.metrics.get("head", {}):
        return no_stronger_than(float(parent.metrics["head"]["l2"]))
    return None


def base_data_strength(train: np.ndarray, train_labels: np.ndarray, splits: Splits,
                       val: np.ndarray, val_labels: np.ndarray, prior: np.ndarray) -> float:
    """A warm start whose parent has no head L2 (a fine-tuned champion) chooses the ceiling
    on val/ from the base data alone, so every challenger of one champion starts from the
    same strength whatever labels it adds (head_strengths says why that matters)."""
    base = slice(0, splits.base_train)
    return fit_head((train[base], train_labels[base]), (val, val_labels), splits.classes,
                    prior).l2


def train_head(cfg: TrainConfig, ctx: DistContext, start: StartingPoint, splits: Splits,
               labels: dict[str, np.ndarray], prior: list[int],
               strengths: tuple[float, ...] | None, warm_start: bool,
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Re-fit the linear head on cached embeddings of the frozen backbone; the model's head
    is set to it. Returns val and test logits and what was chosen."""
    if ctx.world_size > 1:
        raise InputError("the head learner runs in one process (it takes seconds); "
                         "drop torchrun")
    fingerprint = backbone_fingerprint(start.model, start.head_prefix, start.arch,
                                       start.preprocessing)
    cache = EmbeddingCache(Path(cfg.embedding_cache), fingerprint)
    try:
        features = {name: embed_files(start.model, start.head_prefix, start.preprocessing,
                                      [p for p, _ in samples], cache, ctx.device,
                                      cfg.batch_size * 4, cfg.num_workers)
                    for name, samples in (("train", splits.train), ("val", splits.val),
                                          ("test", splits.test))}
    finally:
        cache.close()
    prior = np.asarray(prior, dtype=np.float64)
    if strengths is None and warm_start:
        strengths = no_stronger_than(base_data_strength(
            features["train"], labels["train"], splits, features["val"], labels["val"], prior))
    fit = fit_head((features["train"], labels["train"]), (features["val"], labels["val"]),
                   splits.classes, prior, strengths or L2_GRID)
    set_head(start.model, start.head_prefix, fit)
    log.info("head fit on %d embeddings: l2 %g (val macro-F1 per l2: %s)", len(labels["train"]),
             fit.l2, {k: round(v, 4) for k, v in fit.val_macro_f1.items()})
    info = {"l2": fit.l2, "val_macro_f1_per_l2": {str(k): v for k, v in fit.val_macro_f1.items()},
            "backbone_fingerprint": fingerprint}
    return (logits_of(fit, features["val"]), logits_of(fit, features["test"]), info)


def parity_batch(loader: DataLoader) -> torch.Tensor:
    images = torch.cat([images for images, _ in _take(loader, PARITY_BATCH)])
    return images[:PARITY_BATCH]


def _take(loader: DataLoader, count: int):
    seen = 0
    for images, labels in loader:
        yield images, labels
        seen += len(images)
        if seen >= count:
            return


def write_version(cfg: TrainConfig, store: ModelStore, start: StartingPoint, splits: Splits,
                  metrics: dict, batch: torch.Tensor) -> Path:
    """Build the version in a staging directory, verify exports, then publish it atomically."""
    staging = store.new_staging_dir(cfg.name)
    try:
        model = start.model.cpu().float().eval()
        torch.save(model.state_dict(), staging / "weights.pt")
        exported = export_all(model, batch, staging, metrics["temperature"], cfg.onnx_fp16)
        artifacts = {"state_dict": Artifact("weights.pt", "state_dict",
                                            sha256_file(staging / "weights.pt"))}
        for fmt, (file, diff) in exported.items():
            artifacts[fmt] = Artifact(file, fmt, sha256_file(staging / file), diff)
        for _attempt in range(5):  # another job may publish the same number first
            version = store.next_version(cfg.name)
            manifest = ModelManifest(
                name=cfg.name, version=version, arch=start.arch, classes=splits.classes,
                preprocessing=start.preprocessing, temperature=metrics["temperature"],
                artifacts=artifacts, metrics=metrics, parent_version=start.parent_version,
                dataset_fingerprint=splits.fingerprint, training_config=cfg.to_dict(),
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            write_report(staging, f"{cfg.name} {version}", metrics, splits.classes,
                         metrics["minority"])
            manifest.save(staging)
            try:
                return store.publish(cfg.name, staging, version)
            except (StoreError, OSError):
                log.warning("version %s was taken meanwhile; retrying", version)
        raise StoreError(f"could not publish a new version of {cfg.name}")
    except BaseException:
        store.discard(staging)
        raise


def fit_and_evaluate(cfg: TrainConfig, ctx: DistContext, start: StartingPoint, splits: Splits,
                     loaders: tuple[DataLoader, DataLoader, DataLoader],
                     minority: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """The fine-tune learner: the epoch loop, then (rank 0) the best weights' metrics and
    val/ and test/ logits."""
    fitter = Fitter(cfg, ctx, start, splits, loaders)
    if cfg.resume and fitter.last_path.exists():
        fitter.resume()
    result = fitter.fit()
    if not ctx.is_main:
        return None
    start.model.load_state_dict(result.best_state)
    metrics, val_logits, test_logits = evaluate_and_calibrate(
        start.model, loaders[1], loaders[2], splits, minority, ctx)
    metrics["history"], metrics["best_val_macro_f1"] = result.history, result.best_val_f1
    if cfg.imbalance == "logit_adjust":
        metrics["prior_counts"] = metrics["train_counts"]
    return metrics, val_logits, test_logits


def fit_and_evaluate_head(cfg: TrainConfig, ctx: DistContext, start: StartingPoint,
                          splits: Splits, parent: ModelManifest | None,
                          minority: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The head learner: embeddings, head fit, metrics from the head's logits."""
    prior = head_prior(parent, splits)
    labels = {name: np.array([y for _, y in samples], dtype=np.int64) for name, samples in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    val_logits, test_logits, info = train_head(cfg, ctx, start, splits, labels, prior,
                                               head_strengths(cfg, parent), parent is not None)
    metrics = metrics_from_logits(val_logits, torch.from_numpy(labels["val"]), test_logits,
                                  torch.from_numpy(labels["test"]), splits, minority)
    metrics["head"] = info
    metrics["prior_counts"] = dict(zip(splits.classes, prior, strict=True))
    metrics["history"], metrics["best_val_macro_f1"] = [], info["val_macro_f1_per_l2"][
        str(info["l2"])]
    return metrics, val_logits, test_logits


def train_with(cfg: TrainConfig, ctx: DistContext, splits: Splits, store: ModelStore,
               parent: ModelManifest | None, minority: list[str],
               start: StartingPoint | None = None) -> Trained | None:
    """One learner (head or finetune) from `start` (default: cfg's model or the parent's);
    None on the ranks other than 0."""
    start = start or prepare_model(cfg, splits.classes, store, parent)
    loaders = make_loaders(cfg, splits, start.preprocessing, ctx)
    if cfg.learner == "head":
        outcome = fit_and_evaluate_head(cfg, ctx, start, splits, parent, minority)
    else:
        outcome = fit_and_evaluate(cfg, ctx, start, splits, loaders, minority)
    if outcome is None:
        return None
    metrics, val_logits, test_logits = outcome
    metrics["learner"] = learner_name(cfg, parent)
    if parent is not None and parent.metrics.get("selection"):
        metrics["selection"] = {**parent.metrics["selection"],
                                "inherited_from": parent.version}
    return Trained(cfg, start, metrics, val_logits, test_logits, loaders)


def learner_name(cfg: TrainConfig, parent: ModelManifest | None) -> str:
    """What trained this version: a warm start by its parent's procedure keeps the parent's
    name (e.g. multiblock_head); anything else is the procedure's."""
    if parent is not None and parent.training_config.get("learner") == cfg.learner:
        return parent.metrics.get("learner", cfg.learner)
    return cfg.learner


def candidate_config(cfg: TrainConfig, name: str) -> tuple[TrainConfig, str | None]:
    """The config a candidate trains with (its options on top of cfg's), and the candidate
    whose trained model it starts from, if any."""
    options = dict(CANDIDATES[name])
    init_from = options.pop("init_from", None)
    return replace(cfg, **options, parent=None, work_dir=str(cfg.checkpoint_dir / name)), init_from


def candidate_start(cfg: TrainConfig, splits: Splits, store: ModelStore,
                    parent: ModelManifest | None, init: Trained | None) -> StartingPoint:
    """A fresh model of the candidate's architecture, or a copy of an earlier candidate's
    trained one; the parent (a re-selection) fixes only the classes and the lineage."""
    if init is not None:
        start = copy.deepcopy(init.start)
        start.fitted = True
    else:
        start = prepare_model(cfg, splits.classes, store, None)
    start.parent_version = parent.version if parent else None
    return start


def estimate(cfg: TrainConfig, start: StartingPoint, splits: Splits) -> float:
    probe = copy.deepcopy(start.model)  # a train-mode pass would move the norms' statistics
    set_backbone_trainable(probe, start.head_prefix, True, cfg.tune, cfg.last_blocks)
    size = start.preprocessing.image_size
    return estimated_seconds(seconds_per_image(probe, size, train=True),
                             seconds_per_image(probe, size, train=False), len(splits.train),
                             len(splits.val) + len(splits.test), cfg.epochs, cfg.learner)


def train_auto(cfg: TrainConfig, ctx: DistContext, splits: Splits, store: ModelStore,
               parent: ModelManifest | None, minority: list[str]) -> Trained:
    """Train each candidate that fits in the budget (the first always runs), pick one on
    val/ (trainer.selection) and record every candidate's scores and cost."""
    if ctx.world_size > 1:
        raise InputError("--learner auto runs in one process; name a learner for torchrun")
    started, trained, scores, rows = time.perf_counter(), {}, [], {}
    for name in cfg.candidates:
        torch.manual_seed(cfg.seed)  # a candidate's result does not depend on which ran before
        candidate, init_from = candidate_config(cfg, name)
        start = candidate_start(candidate, splits, store, parent, trained.get(init_from))
        expected, left = estimate(candidate, start, splits), cfg.budget_s - (
            time.perf_counter() - started)
        rows[name] = {"estimated_seconds": round(expected, 1)}
        if scores and expected > left:
            rows[name]["skipped"] = f"estimated {expected:.0f} s, {max(left, 0):.0f} s left"
            log.info("candidate %s skipped: %s", name, rows[name]["skipped"])
            continue
        log.info("candidate %s: training (estimated %.0f s)", name, expected)
        began = time.perf_counter()
        result = train_with(candidate, ctx, splits, store, None, minority, start)
        result.metrics["learner"] = name
        trained[name] = result
        scores.append(CandidateScore(name, result.val_logits.argmax(dim=1).numpy(),
                                     time.perf_counter() - began))
        rows[name].update(test_macro_f1=result.metrics["test"]["macro_f1"],
                          test_minority_recall=result.metrics["minority_recall"])
    labels = np.array([y for _, y in splits.val])
    picked, table = choose(labels, scores, len(splits.classes),
                           [splits.classes.index(c) for c in minority], seed=cfg.seed,
                           preference=PREFERENCE)
    for name, row in table.items():
        rows[name].update(row)
    record_test_differences(rows, trained, picked, splits, minority, cfg.seed)
    chosen = trained[picked]
    chosen.metrics["selection"] = {
        "picked": picked, "budget_s": cfg.budget_s, "train_images": len(splits.train),
        "val_images": len(labels), "seconds": round(time.perf_counter() - started, 1),
        "rule": "among candidates not worse beyond the noise of val/ (paired 95% intervals "
                "of macro-F1 minus the best's and of minority recall minus the best's reach "
                "0), the first in " + ", ".join(PREFERENCE),
        "candidates": rows}
    log.info("auto picked %s:\n%s", picked, format_selection(chosen.metrics["selection"]))
    return chosen


def record_test_differences(rows: dict, trained: dict[str, Trained], picked: str,
                            splits: Splits, minority: list[str], seed: int) -> None:
    """For the record only (the pick never sees test/): each candidate's test macro-F1 and
    minority recall minus the pick's, paired bootstrap 95% intervals over test/ images."""
    labels = np.array([y for _, y in splits.test])
    indexes = [splits.classes.index(c) for c in minority]
    chosen = trained[picked].test_logits.argmax(dim=1).numpy()
    for name, result in trained.items():
        delta = paired_difference(labels, chosen, result.test_logits.argmax(dim=1).numpy(),
                                  len(splits.classes), indexes, seed=seed)
        rows[name]["test_minus_picked"] = {k: v.to_dict() for k, v in delta.items()}


def format_selection(selection: dict) -> str:
    """The candidates as a table: val and test scores, seconds, and which was picked."""
    lines = [f"{'candidate':<18}{'val F1':>8}{'val min.rec':>12}{'test F1':>9}"
             f"{'test min.rec':>13}{'seconds':>9}  note"]
    for name, row in selection["candidates"].items():
        if "skipped" in row:
            lines.append(f"{name:<18}{'':>51}  skipped: {row['skipped']}")
            continue
        note = "picked" if name == selection["picked"] else (
            "within the noise of the best" if row["contender"] else "worse beyond the noise")
        lines.append(f"{name:<18}{_score(row['val_macro_f1']['estimate']):>8}"
                     f"{_score(row['val_minority_recall']['estimate']):>12}"
                     f"{_score(row['test_macro_f1']):>9}"
                     f"{_score(row['test_minority_recall']):>13}"
                     f"{row['seconds']:>9.0f}  {note}")
    return "\n".join(lines)


def _score(value: float | None) -> str:
    """A score for the table; '-' where there is none (no minority class: no minority
    recall)."""
    return "-" if value is None or value != value else f"{value:.3f}"


MIN_DRIFT_REFERENCE = 100  # test/ images below which serving measures no drift


def drift_reference(trained: Trained, splits: Splits) -> dict | None:
    """core.drift's reference for the served model: class centres from its val/ logits,
    thresholds from its test/ logits; None when test/ is too small for a window's spread
    (bootstrap windows of 200 drawn from a handful of images say nothing)."""
    val_labels = np.array([label for _, label in splits.val])
    if len(val_labels) < 2 or len(trained.test_logits) < MIN_DRIFT_REFERENCE:
        log.info("no drift reference: %d test images (it needs %d)", len(trained.test_logits),
                 MIN_DRIFT_REFERENCE)
        return None
    return fit_reference(trained.val_logits.double().numpy(), val_labels,
                         trained.test_logits.double().numpy()).to_dict()


def run_training(cfg: TrainConfig) -> Path | None:
    """Train, evaluate, calibrate, export and publish; returns the version dir (rank 0)."""
    ctx = init_distributed(cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        store = ModelStore(cfg.out)
        parent = (store.load_manifest(cfg.name, store.resolve_version(cfg.name, cfg.parent))
                  if cfg.parent else None)
        splits = load_splits(cfg, parent.classes if parent else None)
        minority = list(cfg.minority) or minority_classes(
            dict(zip(splits.classes, splits.train_counts, strict=True)))
        unknown = sorted(set(minority) - set(splits.classes))
        if unknown:
            raise DataError(f"--minority names unknown classes {unknown}")
        log.info("%d train / %d val / %d test images, %d classes, minority: %s",
                 len(splits.train), len(splits.val), len(splits.test), len(splits.classes),
                 minority or "none")
        log.info("rank %d of world size %d on %s, per rank %d images/epoch", ctx.rank,
                 ctx.world_size, ctx.device, -(-len(splits.train) // ctx.world_size))
        if cfg.learner == "auto":
            trained = train_auto(cfg, ctx, splits, store, parent, minority)
        else:
            trained = train_with(cfg, ctx, splits, store, parent, minority)
        version_dir = None
        if ctx.is_main:
            metrics = trained.metrics
            metrics["drift_reference"] = drift_reference(trained, splits)
            # the chosen candidate's options are what trained it (its learner, arch, size)
            used = replace(trained.cfg, parent=cfg.parent, work_dir=cfg.work_dir)
            version_dir = write_version(used, store, trained.start, splits, metrics,
                                        parity_batch(trained.loaders[2]))
            log.info("published %s: test macro-F1 %.4f, ECE %.4f -> %.4f (T=%.3f)", version_dir,
                     metrics["test"]["macro_f1"], metrics["ece_uncalibrated"],
                     metrics["ece_calibrated"], metrics["temperature"])
        ctx.barrier()
        return version_dir
    finally:
        shutdown(ctx)


"""One training job end to end: data -> model -> epochs -> calibration -> export -> manifest.

Each step is a function; `run_training` only calls them in order. Under torchrun every
rank trains its shard; rank 0 alone evaluates, checkpoints, exports and publishes.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from core.classes import minority_classes
from core.fsutil import sha256_file
from core.manifest import Artifact, ModelManifest, Preprocessing
from core.model_store import ModelStore, StoreError
from core.preprocess import preprocess_image
from trainer import imbalance
from trainer.augment import TrainTransform
from trainer.calibration import calibrated_probabilities, fit_temperature
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import (
    DataError,
    ImageFolderIndex,
    ImageListDataset,
    dataset_fingerprint,
    loader_workers,
    scan_image_folder,
)
from trainer.distributed import DistContext, init_distributed, shutdown
from trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from trainer.engine import predict_logits, train_one_epoch
from trainer.export import export_all
from trainer.head import fit_head, logits_of, set_head
from trainer.metrics import (
    classification_report,
    expected_calibration_error,
    minority_recall,
    reliability_table,
)
from trainer.models import build_model, set_backbone_trainable
from trainer.optim import build_optimizer, build_scheduler, parameter_groups
from trainer.report import write_report
from trainer.sampling import EpochSampler

log = logging.getLogger(__name__)

PARITY_BATCH = 16  # real test images used to verify each export


@dataclass
class Splits:
    classes: tuple[str, ...]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    test_split: str  # which folder the reported metrics come from
    calibration_split: str
    fingerprint: str
    train_counts: list[int] = field(default_factory=list)


@dataclass
class StartingPoint:
    model: nn.Module
    head_prefix: str
    preprocessing: Preprocessing
    arch: str
    parent_version: str | None


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_val_f1: float
    history: list[dict]


def _hold_out(samples: list[tuple[Path, int]], fraction: float,
              seed: int) -> tuple[list, list]:
    """Stratified split: a fraction of every class (at least one, if it has two) goes to val."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    keep, held = [], []
    for items in by_class.values():
        rng.shuffle(items)
        n_val = max(1, round(fraction * len(items))) if len(items) >= 2 else 0
        held += items[:n_val]
        keep += items[n_val:]
    return keep, held


def _per_class_subset(samples: list[tuple[Path, int]], per_class: int | None,
                      seed: int) -> list[tuple[Path, int]]:
    if per_class is None:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    return [s for label in sorted(by_class)
            for s in rng.sample(by_class[label], min(per_class, len(by_class[label])))]


def load_splits(cfg: TrainConfig, classes: tuple[str, ...] | None = None) -> Splits:
    root = Path(cfg.data)
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder (expected an ImageFolder tree: "
                        "train/<class>/*.png, optional val/ and test/)")
    train = scan_image_folder(root / "train", classes, cfg.on_corrupt)
    classes = train.classes
    indexes = [train]
    base = _per_class_subset(train.samples, cfg.base_per_class, cfg.seed)
    extra = []
    for tree in cfg.extra_train:
        index = scan_image_folder(tree, classes, cfg.on_corrupt, subset=True)
        indexes.append(index)
        extra += index.samples
    optional: dict[str, ImageFolderIndex | None] = {}
    for split in ("val", "test"):
        folder = root / split
        optional[split] = (scan_image_folder(folder, classes, cfg.on_corrupt)
                           if folder.is_dir() else None)
        indexes += [optional[split]] if optional[split] else []
    train_samples, val_samples = base, None
    calibration_split = "val/"
    if optional["val"] is not None:
        val_samples = optional["val"].samples
    else:
        train_samples, val_samples = _hold_out(base, cfg.val_fraction, cfg.seed)
        calibration_split = f"{cfg.val_fraction:.0%} of train/ held out"
    train_samples = train_samples + extra  # new labels train; they never become val
    test = optional["test"]
    test_samples = test.samples if test else val_samples
    test_split = "test/" if test else f"{calibration_split} (no test/ given: optimistic)"
    if cfg.test_per_class is not None:
        test_samples = _per_class_subset(test_samples, cfg.test_per_class, cfg.seed)
        test_split += f", {cfg.test_per_class} per class"
    counts = [0] * len(classes)
    for _, label in train_samples:
        counts[label] += 1
    return Splits(
        classes=classes, train=train_samples, val=val_samples,
        test=test_samples, test_split=test_split,
        calibration_split=calibration_split, fingerprint=dataset_fingerprint(indexes),
        train_counts=counts,
    )


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
        logits, labels = predict_logits(self.model, self.val_loader, self.ctx.device,
                                        amp=self.cfg.amp, channels_last=self.cfg.channels_last)
        val_f1 = classification_report(logits, labels, self.splits.classes)["macro_f1"]
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

    def fit(self) -> FitResult:
        started, trainer_model, frozen = time.perf_counter(), None, None
        for epoch in range(self.first_epoch, self.cfg.epochs):
            if frozen != (epoch < self.cfg.freeze_epochs) or trainer_model is None:
                frozen = epoch < self.cfg.freeze_epochs
                set_backbone_trainable(self.model, self.start.head_prefix, not frozen)
                trainer_model = self.ctx.wrap(self.model)  # DDP must see the new trainable set
            self.train_loader.sampler.set_epoch(epoch)
            phase = " (head only)" if frozen else ""
            stats = train_one_epoch(
                trainer_model, self.train_loader, self.loss_fn, self.optimizer, self.scheduler,
                self.ctx.device, amp=self.cfg.amp, channels_last=self.cfg.channels_last,
                description=f"epoch {epoch + 1}/{self.cfg.epochs}{phase}",
                show_progress=self.cfg.show_progress and self.ctx.is_main)
            stop = self.evaluate_epoch(epoch, stats, started) if self.ctx.is_main else False
            if self.ctx.broadcast_flag(stop):
                log.info("early stop: no better val macro-F1 for %d epochs",
                         self.cfg.early_stop_patience)
                break
        return self.result


def evaluate_and_calibrate(model: nn.Module, val_loader: DataLoader, test_loader: DataLoader,
                           splits: Splits, minority: list[str], ctx: DistContext) -> dict:
    val_logits, val_labels = predict_logits(model, val_loader, ctx.device)
    test_logits, test_labels = predict_logits(model, test_loader, ctx.device)
    return metrics_from_logits(val_logits, val_labels, test_logits, test_labels, splits,
                               minority)


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


def head_strength(cfg: TrainConfig, parent: ModelManifest | None) -> float | None:
    """The head's L2 strength: the configured one; else a warm start keeps its parent's;
    else None (chosen on val/). Chosen once, for the champion: re-choosing it in every
    retrain flips between grid values that tie on val/ (macro-F1 0.785 against 0.783) but
    not on test (minority recall 0.699 against 0.732): a random-label retrain in the demo
    moved minority recall by +0.08 without one new minority label, which is noise the
    gate and the comparison with random labelling would then measure."""
    if cfg.head_l2 is not None:
        return cfg.head_l2
    if parent is not None and "l2" in parent.metrics.get("head", {}):
        return float(parent.metrics["head"]["l2"])
    return None


def train_head(cfg: TrainConfig, ctx: DistContext, start: StartingPoint, splits: Splits,
               labels: dict[str, np.ndarray], prior: list[int],
               l2: float | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Re-fit the linear head on cached embeddings of the frozen backbone; the model's head
    is set to it. Returns val and test logits and what was chosen."""
    if ctx.world_size > 1:
        raise ValueError("the head learner runs in one process (it takes seconds); "
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
    fit = fit_head((features["train"], labels["train"]), (features["val"], labels["val"]),
                   splits.classes, np.asarray(prior, dtype=np.float64), l2)
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
                     minority: list[str]) -> dict | None:
    """The fine-tune learner: the epoch loop, then (rank 0) the best weights' metrics."""
    fitter = Fitter(cfg, ctx, start, splits, loaders)
    if cfg.resume and fitter.last_path.exists():
        fitter.resume()
    result = fitter.fit()
    if not ctx.is_main:
        return None
    start.model.load_state_dict(result.best_state)
    metrics = evaluate_and_calibrate(start.model, loaders[1], loaders[2], splits, minority, ctx)
    metrics["history"], metrics["best_val_macro_f1"] = result.history, result.best_val_f1
    if cfg.imbalance == "logit_adjust":
        metrics["prior_counts"] = metrics["train_counts"]
    return metrics


def fit_and_evaluate_head(cfg: TrainConfig, ctx: DistContext, start: StartingPoint,
                          splits: Splits, parent: ModelManifest | None,
                          minority: list[str]) -> dict:
    """The head learner: embeddings, head fit, metrics from the head's logits."""
    prior = head_prior(parent, splits)
    labels = {name: np.array([y for _, y in samples], dtype=np.int64) for name, samples in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    val_logits, test_logits, info = train_head(cfg, ctx, start, splits, labels, prior,
                                               head_strength(cfg, parent))
    metrics = metrics_from_logits(val_logits, torch.from_numpy(labels["val"]), test_logits,
                                  torch.from_numpy(labels["test"]), splits, minority)
    metrics["head"] = info
    metrics["prior_counts"] = dict(zip(splits.classes, prior, strict=True))
    metrics["history"], metrics["best_val_macro_f1"] = [], info["val_macro_f1_per_l2"][
        str(info["l2"])]
    return metrics


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
        start = prepare_model(cfg, splits.classes, store, parent)
        loaders = make_loaders(cfg, splits, start.preprocessing, ctx)
        if cfg.learner == "head":
            metrics = fit_and_evaluate_head(cfg, ctx, start, splits, parent, minority)
        else:
            metrics = fit_and_evaluate(cfg, ctx, start, splits, loaders, minority)
        version_dir = None
        if ctx.is_main:
            version_dir = write_version(cfg, store, start, splits, metrics,
                                        parity_batch(loaders[2]))
            log.info("published %s: test macro-F1 %.4f, ECE %.4f -> %.4f (T=%.3f)", version_dir,
                     metrics["test"]["macro_f1"], metrics["ece_uncalibrated"],
                     metrics["ece_calibrated"], metrics["temperature"])
        ctx.barrier()
        return version_dir
    finally:
        shutdown(ctx)


"""The loop's configurations, `visionloop retrain` and `visionloop demo`: frozen dataclasses
with no heavy imports, so the CLI builds its flags from their fields in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionloop.core.errors import InputError
from visionloop.labeling.label_check import REVIEW_BELOW
from visionloop.serving.capture import CAPTURE_BELOW, CAPTURES_PER_MINUTE

RETRAIN_LEARNERS = ("champion", "auto", "head", "finetune")


@dataclass(frozen=True)
class RetrainConfig:
    name: str = "classifier"  # the model in the store
    store: Path = Path("model_store")  # the model store: one folder per model, one per version
    # the base data (a folder of class folders, or train/ val/ test/); None: the one the
    # champion was trained on. The gate scores on its val split
    data: Path | None = None
    project: str | None = None  # the Label Studio project's title; None: 'visionloop NAME'

    labels_dir: Path = Path("labels")  # what `visionloop label pull` writes
    capture_dir: Path = Path("captures")
    pull: bool = True  # pull from Label Studio first (off: use labels_dir as it is)
    # a pulled label the serving model gives a calibrated probability below this goes back
    # to Label Studio for review before it trains (labeling.label_check); 0: no check
    review_below: float = REVIEW_BELOW
    capture_database: str | None = None  # the capture index's URL; None: SQLite in capture_dir
    min_new_labels: int = 20  # fewer new labels since the last attempt: do nothing
    # when a serving worker reports the traffic drifted (core.drift), retrain on any new
    # label instead of waiting for min_new_labels
    drift_trigger: bool = True
    # the challenger, warm-started from the champion. champion (default): as the champion
    # was trained: its frozen backbone (pretrained, or fine-tuned by its learner) and its
    # linear head re-fit on cached embeddings of all base data + labels, the champion's
    # logit-adjustment prior kept (trainer/head.py; seconds on a CPU); but `auto` once the
    # training set has grown by `reselect_growth` since the champion's learner was chosen.
    # head: that re-fit always. finetune: a short fine-tune of the whole network (epochs,
    # lr, base_per_class apply). auto: choose a learner again (trainer/selection.py).
    learner: str = "champion"
    # re-select (auto) when base + labels reach (1 + this) x the images the champion's
    # learner was chosen on: 0.5 = half as many images again, where the ranking of learners
    # can change (a fine-tune gains more from data than a linear head); a few hundred
    # labels on a few thousand images do not re-select
    reselect_growth: float = 0.5
    budget_s: float = 900.0  # auto: the trainer's time budget
    epochs: int = 2  # learner finetune: epochs of the challenger's fine-tune
    freeze_epochs: int = 0  # learner finetune: head-only epochs first
    lr: float = 1e-3  # learner finetune: the head's learning rate
    base_per_class: int | None = None  # replay at most this many base images per class
    embedding_cache: Path = Path("runs/embeddings")  # backbone features by image sha256
    seed: int = 0  # seeds the challenger's training and the gate's bootstrap
    # the gate (visionloop/gate.py): non-inferiority margins on the lower end of the paired
    # 95% interval of challenger - champion, on the scenario's val/ split
    max_macro_f1_drop: float = 0.01
    max_minority_recall_drop: float = 0.03  # the gate's margin on minority recall
    eval_per_class: int | None = None  # cap gate images per class (None: the whole val/)
    # promotion
    backend: str = "torchscript"
    capture_below: float = CAPTURE_BELOW  # the new champion captures below this confidence
    capture_per_minute: int = CAPTURES_PER_MINUTE  # per TorchServe worker
    work_dir: Path = Path("runs/retrain")  # checkpoints of the challenger's training

    def __post_init__(self) -> None:
        if self.learner not in RETRAIN_LEARNERS:
            raise InputError(f"learner must be one of {', '.join(RETRAIN_LEARNERS)}, "
                             f"got {self.learner!r}")


@dataclass(frozen=True)
class DemoConfig:
    # any folder laid out as core.scenario describes (visionloop data fashion-mnist writes one)
    scenario: Path = Path("data/fashion-mnist-lt")
    out: Path = Path("runs/demo")
    name: str = "fashion"
    rounds: int = 3
    budget: int = 100  # labels per round, for the loop and for the random baseline alike
    stream_per_round: int | None = None  # pool images sent per round; None: pool / rounds
    strategy: str = "class_balanced"
    # the champion: auto = the trainer's default (each candidate learner within
    # champion_budget_s, the best on val/); head = pretrained backbone frozen, linear head
    # on its embeddings; finetune = the whole network for champion_epochs. The retrains
    # keep the champion's backbone and re-fit its head (RetrainConfig.learner "champion")
    learner: str = "auto"
    # auto: what the champion's selection tries, comma-separated, and its time budget. The
    # two multi-block heads (64 and 96 px) take ~3 min on the default scenario; each
    # fine-tune candidate 3-4 min more, which would take the demo past 15 min on 2 cores
    # (bench/learners.py trains them all; `--candidates` of the trainer's config for the
    # full list). Not the last-block head: behind the multi-block one on every scenario
    # of bench/learners.py
    champion_candidates: str = "multiblock_head,multiblock_head_96"
    champion_budget_s: float = 300.0
    image_size: int = 64  # 64 px frozen Lite0 features: macro-F1 0.79 against 0.75 at 32 px
    champion_epochs: int = 4  # finetune only
    retrain_epochs: int = 1  # finetune only
    base_per_class: int | None = None  # base images per class replayed in each retrain
    gate_per_class: int | None = None  # val/ images per class for the gate (None: all)
    report_per_class: int | None = None  # test/ images per class in the report (None: all)
    champion: Path | None = None  # reuse a trained version dir instead of training one
    seed: int = 0
    # Random labelling is a draw: one draw of a few hundred labels may find several minority
    # images or none. The baseline the final comparison uses is the mean of this many draws
    # (the first is also shown round by round); its interval resamples images and draws.
    random_draws: int = 5

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """Minutes on a small scenario: for tests."""
        values = dict(rounds=2, budget=12, stream_per_round=40, champion_epochs=1,
                      retrain_epochs=1, base_per_class=20, gate_per_class=20,
                      report_per_class=20, random_draws=2)
        values.update(overrides)
        return cls(**values)

"""`visionloop demo`: the whole loop on a scenario (core.scenario; by default the long-tailed
Fashion-MNIST), with real servers.

    train the champion (pretrained backbone) -> serve it in TorchServe -> per round:
      stream a slice of the unlabeled pool through the inference endpoint (an application)
      -> push the uncertain images to Label Studio (class-balanced) -> a stand-in annotator
      answers them through Label Studio's API with the pool's true labels -> retrain
      (pull, challenger, gate, zero-downtime promotion)
    and, in the same run, a baseline spending the same label budget on images picked at
    random from the same stream, retrained the same way (it needs no server). Random
    labelling is a draw, so the baseline is drawn --random-draws times: the first round by
    round, the others once at the end (random picks do not depend on the model); the final
    comparison is against their mean.

Each branch's serving model is scored after every round on the whole test/ split through
the served path, with bootstrap 95% intervals. Everything lives under --out (default
runs/demo, cleared at start): model_store/, captures/, labels/, Label Studio's and
TorchServe's homes, and report.md + report.png + report.json at the end. Embeddings are
cached beside --out (embeddings/), so a second run skips computing them.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from visionloop.configs import DemoConfig, RetrainConfig
from visionloop.core.bootstrap import (
    Interval,
    intervals,
    intervals_of_mean,
    paired_difference,
    paired_difference_to_mean,
)
from visionloop.core.errors import InputError
from visionloop.core.manifest import ModelManifest
from visionloop.core.ports import free_loopback_ports
from visionloop.core.scenario import check_layout, read_pool
from visionloop.demo_report import write_report
from visionloop.labeling import server as labelstudio_server
from visionloop.labeling.client import connect
from visionloop.labeling.project import FROM_NAME, TO_NAME, default_title, ensure_project
from visionloop.labeling.push import PushOptions, push
from visionloop.labeling.server import LabelStudioConfig
from visionloop.retrain import evaluate, held_out_samples, retrain_once
from visionloop.serving import server as torchserve_server
from visionloop.serving.archive import package
from visionloop.serving.capture import capture_policy
from visionloop.serving.handler import ServingConfig
from visionloop.serving.server import ServerConfig
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.train import run_training

log = logging.getLogger("visionloop.demo")
DEMO_MARKER = ".visionloop-demo"


@dataclass
class RoundResult:
    round: int
    branch: str  # "loop" (Label Studio, class-balanced) or "random"
    labels: int  # labels spent so far
    minority_labels: int  # of them, images of minority classes
    version: str
    macro_f1: Interval  # on the report split (test/), bootstrap 95% interval
    minority_recall: Interval
    ece: float
    per_class_recall: dict[str, float] = field(default_factory=dict)
    promoted: bool | None = None


class Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def step(self, message: str, *args: object) -> None:
        log.info("[%5.0fs] " + message, time.monotonic() - self.start, *args)


def pool_truth(scenario: Path) -> tuple[list[Path], dict[str, str]]:
    """Pool files in a fixed shuffled order, and sha256 -> true label."""
    pool = read_pool(scenario)
    random.Random(0).shuffle(pool)
    return ([p for p, _ in pool],
            {hashlib.sha256(p.read_bytes()).hexdigest(): label for p, label in pool})


def stream_sizes(pool: int, cfg: DemoConfig) -> int:
    """Images streamed per round: the pool split evenly over the rounds unless given; refused
    up front when a round could not offer the random baseline its budget."""
    per_round = cfg.stream_per_round if cfg.stream_per_round is not None else pool // cfg.rounds
    if per_round * cfg.rounds > pool:
        raise InputError(f"the pool has {pool} images: {cfg.rounds} rounds of "
                         f"{per_round} need {per_round * cfg.rounds}; pass --stream-per-round "
                         f"{pool // cfg.rounds} or less, or fewer --rounds")
    if per_round < cfg.budget:
        raise InputError(f"each round streams {per_round} images, fewer than the budget of "
                         f"{cfg.budget} labels (the pool has {pool} images for {cfg.rounds} "
                         "rounds): lower --budget or --rounds")
    return per_round


def stream(url: str, files: list[Path], concurrency: int = 4) -> tuple[int, int]:
    """POST every file to the inference endpoint as an application would: (ok, failed)."""
    def send(path: Path) -> bool:
        request = urllib.request.Request(url, data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status == 200
        except OSError:
            return False

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, files))
    return sum(results), len(results) - sum(results)


def annotate_as_truth(client, project_id: int, truth: dict[str, str]) -> list[str]:
    """The stand-in annotator: answer every unanswered task with the pool's true label."""
    answered = []
    for task in client.tasks.list(project=project_id, fields="all"):
        if task.annotations or "capture_sha" not in (task.data or {}):
            continue
        label = truth[task.data["capture_sha"]]
        client.annotations.create(id=task.id, result=[{
            "from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
            "value": {"choices": [label]}}])
        answered.append(label)
    return answered


def random_labels(streamed: list[Path], budget: int, labels_dir: Path, truth_by_file,
                  rng: random.Random) -> list[str]:
    """The baseline's annotator: `budget` random images of the same stream, true labels."""
    chosen = rng.sample(streamed, min(budget, len(streamed)))
    for path in chosen:
        target = labels_dir / "images" / truth_by_file[path.name] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return [truth_by_file[p.name] for p in chosen]


def train_champion(cfg: DemoConfig, store: Path) -> Path:
    if cfg.champion is not None:
        target = store / cfg.name / "v1"
        shutil.copytree(cfg.champion, target)
        return target
    return run_training(TrainConfig(
        data=str(cfg.scenario), out=str(store), name=cfg.name, image_size=cfg.image_size,
        learner=cfg.learner, budget_s=cfg.champion_budget_s,
        candidates=tuple(cfg.champion_candidates.split(",")),
        embedding_cache=str(embedding_cache(cfg)),
        epochs=cfg.champion_epochs, freeze_epochs=min(1, cfg.champion_epochs),
        seed=cfg.seed, show_progress=False, work_dir=str(cfg.out / "work" / "champion")))


def embedding_cache(cfg: DemoConfig) -> Path:
    """Beside --out, not inside it: the next demo run on the same images reuses it."""
    return cfg.out.parent / "embeddings"


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg, self.timer = cfg, Timer()
        out = cfg.out
        self.store = out / "model_store"
        self.captures = out / "captures"
        ports = free_loopback_ports(6)
        self.labelstudio = LabelStudioConfig(data_dir=out / "labelstudio",
                                             files_root=self.captures, port=ports[0])
        self.torchserve = ServerConfig(
            home=out / "torchserve", model_store=out / "torchserve" / "model-store",
            capture_dir=self.captures, inference_port=ports[1], management_port=ports[2],
            metrics_port=ports[3], grpc_inference_port=ports[4], grpc_management_port=ports[5])
        self.results: list[RoundResult] = []
        self.draws: list[dict] = []  # the random baseline's draws, final models

    def retrain_config(self, name: str, labels_dir: Path) -> RetrainConfig:
        c = self.cfg
        return RetrainConfig(
            name=name, store=self.store, data=c.scenario, labels_dir=labels_dir,
            capture_dir=self.captures, min_new_labels=1,
            # the stand-in annotator is always right: a check could only delay its labels
            # (bench/label_check.py measures the check with an annotator who is not)
            review_below=0.0,
            learner="finetune" if c.learner == "finetune" else "champion",
            epochs=c.retrain_epochs, base_per_class=c.base_per_class,
            embedding_cache=embedding_cache(c), eval_per_class=c.gate_per_class, seed=c.seed,
            capture_per_minute=1_000_000, work_dir=c.out / "work" / name)

    def run(self) -> Path:
        out = self.cfg.out
        wipe = out.exists() and any(out.iterdir())
        if wipe and not (out / DEMO_MARKER).exists():  # never wipe a folder the demo did not make
            raise InputError(f"{out} exists and is not a demo directory; pick another --out")
        check_layout(self.cfg.scenario)
        self.per_round = stream_sizes(len(read_pool(self.cfg.scenario)), self.cfg)
        if wipe:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARKER).write_text("made by visionloop demo; cleared by the next run\n")
        # Label Studio's first start migrates its database (~1 min): overlap it with training
        started: dict = {}
        starter = threading.Thread(target=self._start_labelstudio, args=(started,), daemon=True)
        starter.start()
        try:
            return self._loop(starter, started)
        finally:
            torchserve_server.stop(self.torchserve)
            labelstudio_server.stop(self.labelstudio)

    def _start_labelstudio(self, started: dict) -> None:
        try:
            labelstudio_server.start(self.labelstudio)
            started["ok"] = True
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
            started["error"] = exc

    def _score(self, branch: str, round_: int, labels: list[str], version_dir: Path,
               promoted: bool | None) -> None:
        """Evaluate a branch's serving version on the report split (the served path), with
        bootstrap intervals; every figure lands in report.json too."""
        evaluation, predicted, scores = self._evaluate(version_dir, seed=round_)
        self.predictions[(branch, round_)] = predicted
        self.results.append(RoundResult(
            round_, branch, len(labels), sum(lbl in self.minority for lbl in labels),
            version_dir.name, scores["macro_f1"], scores["minority_recall"], evaluation.ece,
            evaluation.per_class_recall, promoted))
        self.timer.step("round %d %s: %s, macro-F1 %s, minority recall %s", round_, branch,
                        version_dir.name, scores["macro_f1"], scores["minority_recall"])

    def _evaluate(self, version_dir: Path, seed: int):
        """(evaluation, predictions, bootstrap intervals) of a version on the report split,
        through the served path."""
        evaluation, predicted = evaluate(version_dir, self.report_samples, self.minority)
        scores = intervals(self.report_labels, predicted, len(self.classes),
                           [self.classes.index(c) for c in self.minority], seed=seed)
        return evaluation, predicted, scores

    def _first_draw(self) -> None:
        final = next(r for r in reversed(self.results) if r.branch == "random")
        self.draws.append({"draw": 1, "minority_labels": final.minority_labels,
                           "macro_f1": final.macro_f1.to_dict(),
                           "minority_recall": final.minority_recall.to_dict(),
                           "predicted": self.predictions[("random", final.round)]})

    def _another_draw(self, draw: int, champion_dir: Path, files: list[Path],
                      truth_by_file: dict[str, str]) -> None:
        """The same budget from each round's stream with another seed, one retrain at the end
        (what the per-round retrains converge to: the head's fit has one optimum)."""
        c = self.cfg
        name = f"{c.name}-random{draw}"
        labels_dir = c.out / f"labels-random{draw}"
        shutil.copytree(champion_dir, self.store / name / "v1")
        rng = random.Random(f"{c.seed}-draw-{draw}")
        spent: list[str] = []
        for round_ in range(1, c.rounds + 1):
            streamed = files[(round_ - 1) * self.per_round:round_ * self.per_round]
            spent += random_labels(streamed, c.budget, labels_dir, truth_by_file, rng)
        decision = retrain_once(replace(self.retrain_config(name, labels_dir), pull=False,
                                        max_macro_f1_drop=1.0, max_minority_recall_drop=1.0))
        _, predicted, scores = self._evaluate(self.store / name / decision.challenger,
                                              seed=c.rounds)
        minority_labels = sum(lbl in self.minority for lbl in spent)
        self.draws.append({"draw": draw, "minority_labels": minority_labels,
                           "macro_f1": scores["macro_f1"].to_dict(),
                           "minority_recall": scores["minority_recall"].to_dict(),
                           "predicted": predicted})
        self.timer.step("random draw %d: %d labels (%d minority), macro-F1 %s, minority "
                        "recall %s", draw, len(spent), minority_labels, scores["macro_f1"],
                        scores["minority_recall"])

    def _serving_dir(self, name: str, decision) -> Path:
        version = decision.challenger if decision.promoted else decision.champion
        return self.store / name / version

    def _loop(self, starter: threading.Thread, started: dict) -> Path:
        c, t = self.cfg, self.timer
        if c.learner == "auto":  # each candidate has its own input size
            t.step("training the champion (auto learner: %s)", c.champion_candidates)
        else:
            t.step("training the champion (%s learner, %d px)", c.learner, c.image_size)
        champion_dir = train_champion(c, self.store)
        manifest = ModelManifest.load(champion_dir)
        t.step("champion: %s (%s)", manifest.version, manifest.metrics.get("learner", c.learner))
        self.classes, self.minority = manifest.classes, list(manifest.minority_classes)
        # the random baseline trains its own line of versions from the same champion
        shutil.copytree(champion_dir, self.store / f"{c.name}-random" / "v1")
        self.report_samples = held_out_samples(c.scenario, self.classes, c.report_per_class)
        self.report_labels = np.array([y for _, y in self.report_samples])
        self.predictions: dict[tuple[str, int], np.ndarray] = {}
        self._score("loop", 0, [], champion_dir, None)
        # both branches start from the same champion: one evaluation serves both
        self.results.append(replace(self.results[-1], branch="random"))
        self.predictions[("random", 0)] = self.predictions[("loop", 0)]

        serving = ServingConfig(capture=capture_policy(manifest, per_minute=1_000_000))
        mar = package(champion_dir, self.torchserve.model_store, "torchscript", serving=serving)
        torchserve_server.start(self.torchserve, {c.name: mar.name})
        t.step("TorchServe serves %s v1 on %s", c.name, self.torchserve.url("inference"))
        starter.join()
        if "error" in started:
            raise started["error"]
        client = connect(self.labelstudio)
        project = ensure_project(client, default_title(c.name), self.classes)
        t.step("Label Studio up on %s, project %d", self.labelstudio.url, project.id)

        files, truth = pool_truth(c.scenario)
        truth_by_file = {p.name: truth[hashlib.sha256(p.read_bytes()).hexdigest()]
                         for p in files}
        loop_labels: list[str] = []
        random_spent: list[str] = []
        rng = random.Random(c.seed)
        loop_dir = champion_dir
        url = f"{self.torchserve.url('inference')}/predictions/{c.name}"
        for round_ in range(1, c.rounds + 1):
            streamed = files[(round_ - 1) * self.per_round:round_ * self.per_round]
            ok, failed = stream(url, streamed)
            t.step("round %d: streamed %d pool images through TorchServe (%d failed)",
                   round_, ok, failed)
            pushed = push(self.captures, client, project, c.name, self.minority,
                          PushOptions(budget=c.budget, strategy=c.strategy, seed=round_))
            answered = annotate_as_truth(client, project.id, truth)
            loop_labels += answered
            t.step("round %d: pushed %d tasks, annotated %d (%d minority)", round_,
                   pushed.pushed, len(answered), sum(a in self.minority for a in answered))
            decision = retrain_once(self.retrain_config(c.name, c.out / "labels"),
                                    self.labelstudio, self.torchserve)
            if decision is not None:  # None: nothing was captured and labelled this round
                t.step("round %d: %s %s (%s)", round_, decision.challenger,
                       "promoted" if decision.promoted else "kept out", decision.reason)
                loop_dir = self._serving_dir(c.name, decision)
            self._score("loop", round_, loop_labels, loop_dir,
                        decision.promoted if decision else None)

            random_spent += random_labels(streamed, c.budget, c.out / "labels-random",
                                          truth_by_file, rng)
            # not gated: the baseline is what labelling at random and retraining gives
            baseline = retrain_once(replace(self.retrain_config(f"{c.name}-random",
                                                                c.out / "labels-random"),
                                            pull=False, max_macro_f1_drop=1.0,
                                            max_minority_recall_drop=1.0))
            self._score("random", round_, random_spent,
                        self.store / f"{c.name}-random" / baseline.challenger, None)
        self._first_draw()
        for draw in range(2, c.random_draws + 1):
            self._another_draw(draw, champion_dir, files, truth_by_file)
        comparison = final_comparison(self.report_labels, self.predictions, c.rounds,
                                      self.classes, self.minority, self.draws)
        report = write_report(c, self.results, self.minority, comparison,
                              time.monotonic() - t.start, self.store / c.name / "registry.md",
                              [{k: v for k, v in d.items() if k != "predicted"}
                               for d in self.draws], manifest.metrics.get("selection"))
        t.step("report: %s", report)
        return report


def final_comparison(labels: np.ndarray, predictions: dict[tuple[str, int], np.ndarray],
                     rounds: int, classes: tuple[str, ...], minority: list[str],
                     draws: list[dict]) -> dict:
    """Paired intervals of the last round's loop against the random draws' mean, against
    the first draw alone and against the champion; the draws' mean with its own interval."""
    minority_idx = [classes.index(c) for c in minority]
    final = predictions[("loop", rounds)]
    drawn = [d["predicted"] for d in draws]
    comparison = {"loop_minus_random_mean": {k: v.to_dict() for k, v in paired_difference_to_mean(
        labels, drawn, final, len(classes), minority_idx).items()}}
    comparison.update({name: {k: v.to_dict() for k, v in paired_difference(
                labels, predictions[other], final, len(classes), minority_idx).items()}
            for name, other in (("loop_minus_random_draw_1", ("random", rounds)),
                                ("loop_minus_champion", ("loop", 0)))})
    comparison["random_mean"] = {k: v.to_dict() for k, v in intervals_of_mean(
        labels, drawn, len(classes), minority_idx).items()}
    return comparison


def run_demo(cfg: DemoConfig) -> Path:
    return Demo(cfg).run()


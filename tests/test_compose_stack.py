"""docker-compose.yml brought up for real with podman-compose, and the loop run through it.

What a deployer does, with the images this repository builds: train the first version in
a one-off container, `up`, send real images to the published inference API, push the
uncertain ones into Label Studio, answer the tasks through Label Studio's API, run one
retrain, see the promoted version serve; then `down` and `up` again and find the models,
the captures, the labels and Label Studio's data where they were.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import MINORITY
from tests.containers import PODMAN, ROOT, build_service_images, podman, shared_folder
from tests.load import Load, Outcome, send, summary
from tests.servers import metric_samples
from visionloop.core.ports import free_loopback_ports
from visionloop.core.scenario import read_pool
from visionloop.labeling.project import FROM_NAME, TO_NAME

pytestmark = pytest.mark.container

PROJECT = "vltest"
MODEL = "fm"
# the flags every visionloop service passes to reach Label Studio inside the network
LABELSTUDIO = ["--labelstudio-host", "labelstudio", "--labelstudio-port", "8080",
               "--labelstudio-dir", "/srv/labels/labelstudio"]


def last_json(stdout: str) -> dict:
    """The JSON object a visionloop command prints last (anything before it is ignored)."""
    return json.loads(stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout)


class Stack:
    def __init__(self, env_file: Path, env: dict[str, str]) -> None:
        self.env_file, self.env = env_file, env
        self.inference = f"http://127.0.0.1:{env['INFERENCE_PORT']}"
        self.labelstudio = f"http://127.0.0.1:{env['LABEL_STUDIO_PORT']}"

    def command(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).with_name("podman-compose")), "--podman-path",
                PODMAN, "-p", PROJECT, "--env-file", str(self.env_file),
                "-f", str(ROOT / "docker-compose.yml"), *args]

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, (f"{' '.join(args)}: {result.stdout[-3000:]}\n"
                                        f"{result.stderr[-3000:]}")
        return result

    def remove_everything(self) -> None:
        """Every container of the project, the replicas profile's too, and its volumes."""
        subprocess.run(self.command("--profile", "replicas", "down", "-v"),
                       capture_output=True, timeout=600)
        leftovers = podman("ps", "-a", "--filter", f"name={PROJECT}_", "--format", "{{.Names}}")
        assert not leftovers.stdout.strip(), f"containers left: {leftovers.stdout}"

    def push_and_answer(self, budget: int, truth: dict[str, str]) -> tuple[dict, list]:
        """One push from the push service, then every unanswered task answered with its
        image's true label through Label Studio's API, review tasks (labeling.pull) too, as
        an annotator takes what the queue hands out; (push summary, answered tasks)."""
        pushed = last_json(self.visionloop("push", "label", "push", "--budget", str(budget),
                                           "--name", MODEL, "--store", "/srv/model_store",
                                           "--capture-dir", "/srv/captures", *LABELSTUDIO))
        assert pushed["pushed"] > 0
        client, answered = self.client(), []
        for task in client.tasks.list(project=pushed["project"], fields="all"):
            if not task.total_annotations:
                client.annotations.create(id=task.id, result=[{
                    "from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                    "value": {"choices": [truth[task.data.get("capture_sha")
                                                     or task.data["review_sha"]]]}}])
                answered.append(task)
        return pushed, answered

    def retrain(self, *torchserve: str) -> dict:
        """One retrain run in the retrain service, promoting into `torchserve` (its flags),
        with the gate's margins opened: the small test set's intervals are too wide to
        promote on; its decision."""
        return last_json(self.visionloop(
            "retrain", "retrain", "--name", MODEL, "--store", "/srv/model_store", "--data",
            "/srv/data", "--labels-dir", "/srv/labels", "--capture-dir", "/srv/captures",
            *LABELSTUDIO, *torchserve, "--torchserve-model-store",
            "/srv/torchserve/model-store", "--min-new-labels", "1", "--max-macro-f1-drop", "1",
            "--max-minority-recall-drop", "1", timeout=1200))

    def visionloop(self, service: str, *args: str, timeout: float = 900) -> str:
        """`visionloop ARGS` inside the running service's container."""
        return self.compose("exec", "-T", service, "visionloop", *args, timeout=timeout).stdout

    @property
    def predictions_url(self) -> str:
        return f"{self.inference}/predictions/{MODEL}"

    def predict(self, body: bytes) -> Outcome:
        return send(self.predictions_url, body)

    def wait_serving(self, body: bytes, version: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = self.predict(body)
            if outcome.ok and outcome.version == version:
                return
            time.sleep(2)
        raise AssertionError(f"{MODEL} {version} not served in {timeout:.0f} s "
                             f"(last: {outcome}); {self.logs('torchserve')}")

    def wait_labelstudio(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.labelstudio}/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "UP":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(3)
        raise AssertionError(f"Label Studio not healthy in {timeout:.0f} s; "
                             f"{self.logs('labelstudio')}")

    def healthy(self, service: str, timeout: float = 120) -> None:
        """Run the service's compose healthcheck (podman schedules none without systemd)
        until it passes."""
        deadline = time.monotonic() + timeout
        while podman("healthcheck", "run", f"{PROJECT}_{service}_1").returncode != 0:
            assert time.monotonic() < deadline, f"{service} unhealthy; {self.logs(service)}"
            time.sleep(3)

    def logs(self, service: str) -> str:
        result = subprocess.run([PODMAN, "logs", "--tail", "40", f"{PROJECT}_{service}_1"],
                                capture_output=True, text=True, timeout=60)
        return result.stdout[-3000:] + result.stderr[-3000:]

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.labelstudio, api_key=self.env["LABEL_STUDIO_TOKEN"])

    def volume(self, name: str) -> Path:
        result = podman("volume", "inspect", f"{PROJECT}_{name}", "--format", "{{.Mountpoint}}")
        assert result.returncode == 0, result.stderr
        return Path(result.stdout.strip())

    def scrape(self, service: str, port: int) -> dict[tuple[str, tuple], float]:
        """A service's Prometheus endpoint, fetched inside the compose network (none is
        published) and parsed with the official client: (name, labels) -> value."""
        return metric_samples(self.compose("exec", "-T", service, "curl", "-fsS",
                                           f"http://127.0.0.1:{port}/metrics").stdout)

    def captures_in_index(self) -> int:
        out = self.compose("exec", "-T", "-e", f"PGPASSWORD={self.env['POSTGRES_PASSWORD']}",
                           "postgres", "psql", "-h", "127.0.0.1", "-U",
                           "visionloop", "-d", "captures", "-tAc",
                           "SELECT count(*) FROM captures").stdout
        return int(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stack(visionloop_image, small_scenario, tmp_path_factory):
    build_service_images()
    data = shared_folder(small_scenario)  # DATA_DIR: read by the containers' uid 1000
    inference_port, labelstudio_port, balancer_port = free_loopback_ports(3)
    env = {"LABEL_STUDIO_TOKEN": secrets.token_hex(20),
           "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(18),
           "LABEL_STUDIO_SECRET_KEY": "k" + secrets.token_urlsafe(40),
           "VISIONLOOP_BACKEND_SECRET": secrets.token_urlsafe(24),
           "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
           "MODEL_NAME": MODEL, "DATA_DIR": str(data),
           "INFERENCE_PORT": str(inference_port), "LABEL_STUDIO_PORT": str(labelstudio_port),
           "BALANCER_PORT": str(balancer_port),
           "VISIONLOOP_IMAGE": visionloop_image,
           # the test runs each job itself: the daemons' first run, at `up`, fails (Label
           # Studio is still migrating) and waits a day
           "PUSH_EVERY": "24h", "RETRAIN_EVERY": "24h", "RETRY_AFTER": "24h"}
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    stack = Stack(env_file, env)
    stack.remove_everything()  # what an earlier run that was killed may have left
    try:
        yield stack
    finally:
        stack.remove_everything()
        shutil.rmtree(data)


def test_the_compose_stack_runs_the_loop_and_keeps_everything_across_down_and_up(
        stack, small_scenario, capsys):
    report, started = [], time.monotonic()
    # the first version, trained in a one-off container on the data volume
    stack.compose("run", "--rm", "--no-deps", "retrain", "train", "--data", "/srv/data",
                  "--out", "/srv/model_store", "--name", MODEL, "--learner", "head",
                  "--image-size", "32", "--minority", ",".join(MINORITY), "--num-workers", "0",
                  "--no-show-progress", "--work-dir", "/srv/runs/train", timeout=1200)
    stack.compose("up", "-d")
    pool = read_pool(small_scenario)
    bodies = [path.read_bytes() for path, _ in pool]
    truth = {hashlib.sha256(b).hexdigest(): label for b, (_, label) in zip(bodies, pool,
                                                                          strict=True)}
    stack.wait_serving(bodies[0], "v1")
    stack.wait_labelstudio()
    for service in ("postgres", "labelstudio", "torchserve", "ml-backend"):
        stack.healthy(service)
    report.append(f"up, serving v1 and every healthcheck passing in "
                  f"{time.monotonic() - started:.0f} s")

    replies = [stack.predict(body) for body in bodies]
    assert all(o.ok for o in replies), summary(replies)
    captured = sum(bool(o.captured) for o in replies)
    assert captured > 0
    assert stack.captures_in_index() >= captured
    report.append(f"{len(bodies)} images sent, {captured} captured into PostgreSQL")

    pushed, tasks = stack.push_and_answer(30, truth)
    client = stack.client()
    project = client.projects.get(id=pushed["project"])
    assert len(list(client.tasks.list(project=project.id))) == pushed["pushed"] == len(tasks)
    report.append(f"{len(tasks)} tasks in Label Studio, answered through its API")

    decision = stack.retrain("--torchserve-host", "torchserve",
                             "--torchserve-home", "/srv/torchserve/home")
    assert decision["promoted"] and decision["challenger"] == "v2", decision
    assert "TorchServe now serves v2" in decision["reason"], decision
    stack.wait_serving(bodies[0], "v2", timeout=60)
    report.append(f"retrain pulled {decision['new_labels']} labels, promoted v2: "
                  f"{decision['reason']}")

    report.append(scrape_after_the_round(stack, small_scenario, client, project, decision,
                                         len(tasks)))

    rows_before = stack.captures_in_index()
    annotated_before = sum(t.total_annotations for t in client.tasks.list(project=project.id))
    stack.compose("down")
    stack.compose("up", "-d")
    stack.wait_serving(bodies[0], "v2")
    stack.wait_labelstudio()
    client = stack.client()
    tasks_after = list(client.tasks.list(project=project.id))
    # retrain's pull sends the answers the model contradicts back as review tasks
    reviews = [t for t in tasks_after if "review_of" in (t.data or {})]
    assert len(tasks_after) - len(reviews) == len(tasks)
    assert sum(t.total_annotations for t in tasks_after) == annotated_before == len(tasks)
    assert stack.captures_in_index() >= rows_before  # (the readiness probes may add some)
    store = stack.volume("model_store") / MODEL
    assert (store / "CHAMPION").read_text().strip() == "v2"
    assert (store / "v1" / "manifest.json").exists() and (store / "v2" / "manifest.json").exists()
    labelled = [p for p in (stack.volume("labels") / "images").rglob("*") if p.is_file()]
    assert len(labelled) == len(tasks) - len(reviews) == decision["new_labels"]
    report.append(f"down and up: serves v2; {len(tasks_after)} tasks ({len(reviews)} of them "
                  "reviews) with "
                  f"{annotated_before} annotations, {rows_before} capture rows, v1 and v2, "
                  f"{len(labelled)} pulled label images: all kept")
    with capsys.disabled():
        print("\ncompose stack (podman-compose): " + "; ".join(report)
              + f"; {time.monotonic() - started:.0f} s in all")


def scrape_after_the_round(stack: Stack, small_scenario: Path, client, project, decision: dict,
                           first_tasks: int) -> str:
    """Every long-running visionloop process's scrape endpoint after push, answers, a
    retrain and its gate: each count against the store it comes from."""
    import random

    from visionloop.core.model_store import ModelStore
    from visionloop.core.registry import Registry

    # a full drift window of traffic like the test split, so TorchServe has a reading
    tests = sorted((small_scenario / "test").rglob("*.png"))
    random.Random(0).shuffle(tests)
    assert all(stack.predict(p.read_bytes()).ok for p in tests[:200])

    def of_model(scraped: dict, name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in scraped.items()
                if n == name and ("ModelName", MODEL) in labels}

    deadline = time.monotonic() + 30  # the frontend takes the workers' metrics from their logs
    while True:
        torchserve = stack.scrape("torchserve", 8082)
        captured = sum(of_model(torchserve, "CapturedPredictions_total").values())
        if captured == stack.captures_in_index() or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert captured == stack.captures_in_index() > 0, captured  # one TorchServe wrote them all
    assert list(of_model(torchserve, "ServedVersion").values()) == [2.0]
    assert of_model(torchserve, "CapturesRateLimited_total")  # (the parser adds _total)
    drift = {dict(labels)["Statistic"]: v
             for labels, v in of_model(torchserve, "TrafficDrift").items()
             if ("ModelVersion", "v2") in labels}
    assert {"distance", "mix", "distance_threshold", "drifted"} <= set(drift), drift

    backend = stack.scrape("ml-backend", 9090)
    tasks_now = list(client.tasks.list(project=project.id, fields="all"))
    reviews = [t for t in tasks_now if "review_of" in (t.data or {})]
    registry = Registry(ModelStore(stack.volume("model_store")), MODEL)
    gated = [d for d in registry.decisions() if d.gate]
    labelled = [p for p in (stack.volume("labels") / "images").rglob("*") if p.is_file()]
    assert backend[("visionloop_captures", ())] == stack.captures_in_index()
    assert backend[("visionloop_tasks_pushed", ())] == len(tasks_now) - len(reviews) \
        == first_tasks
    assert backend[("visionloop_labels_pulled", ())] == len(labelled) == decision["new_labels"]
    assert backend[("visionloop_labels_waiting_for_review", ())] == len(reviews)
    assert backend[("visionloop_labels_waiting_for_retrain", ())] == 0  # v2 trained on all
    assert backend[("visionloop_gate_decisions_total", (("promoted", "true"),))] == \
        sum(d.promoted for d in gated) == 1
    assert backend[("visionloop_gate_decisions_total", (("promoted", "false"),))] == 0
    assert backend[("visionloop_champion_version", ())] == 2
    assert ("visionloop_ml_backend_predict_seconds_count", ()) in backend

    runs = {}
    for job in ("push", "retrain"):  # each daemon ran once at `up`, then waits a day
        scraped = stack.scrape(job, 9100)
        runs[job] = {dict(labels)["outcome"]: v for (n, labels), v in scraped.items()
                     if n == "visionloop_job_runs_total" and ("job", job) in labels}
        assert sum(runs[job].values()) == 1, (job, runs[job])
        assert ("visionloop_job_last_run_seconds", (("job", job),)) in scraped
    return (f"scraped after the round: TorchServe {captured:.0f} captures (= the index), "
            f"serves v2, drift distance {drift['distance']:.1f} (threshold "
            f"{drift['distance_threshold']:.1f}); ML backend {len(tasks_now) - len(reviews)} "
            f"tasks pushed, {len(labelled)} labels pulled (0 waiting for a retrain), "
            f"{len(reviews)} waiting for review, "
            f"1 gate decision promoted, champion 2 (each = its store); schedulers' runs "
            f"{runs}")


def test_the_replicas_profile_rolls_a_promotion_through_both_under_load(stack, small_scenario,
                                                                       capsys):
    """After the loop test (a champion serving, captures to push): `--profile replicas up`
    adds a second TorchServe and HAProxy; requests flow through the balancer while a
    retrain rolls its challenger through both replicas, and none of them fails."""
    stack.compose("--profile", "replicas", "up", "-d")
    balancer = f"http://127.0.0.1:{stack.env['BALANCER_PORT']}"
    pool = read_pool(small_scenario)
    bodies = [path.read_bytes() for path, _ in pool]
    truth = {hashlib.sha256(b).hexdigest(): label for b, (_, label) in zip(bodies, pool,
                                                                          strict=True)}
    # the first test sent test/ images too (a drift window): any of them can be pushed now
    truth.update({hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.name
                  for p in (small_scenario / "test").rglob("*.png")})
    champion = (stack.volume("model_store") / MODEL / "CHAMPION").read_text().strip()
    through = Stack(stack.env_file, {**stack.env, "INFERENCE_PORT": stack.env["BALANCER_PORT"]})
    through.wait_serving(bodies[0], champion)
    assert balancer == through.inference
    # fresh labels for the retrain: the captures test 1 did not push
    stack.push_and_answer(10, truth)

    # bounds well past a retrain's (its timeout is 1200 s): the load must outlast it
    with Load([through.predictions_url], bodies, threads=3, max_requests=9000,
              max_seconds=1500) as load:
        load.wait_for_outcomes(10)  # the champion serves the load through the balancer
        started = time.monotonic()
        decision = stack.retrain("--torchserve-url", "http://torchserve:8081",
                                 "--torchserve-url", "http://torchserve-b:8081")
        retrained = time.monotonic()
        load.wait_for_outcomes(10, sent_after=retrained)
    outcomes = load.outcomes()
    challenger = decision["challenger"]
    assert decision["promoted"] and challenger != champion, decision
    assert f"2 TorchServe replicas now serve {challenger}" in decision["reason"], decision
    failed = [o for o in outcomes if not o.ok]
    with capsys.disabled():
        print(f"\ncompose replicas profile: rolling promotion {champion} -> {challenger} "
              f"through 2 replicas behind HAProxy under load: {len(outcomes)} requests, "
              f"{dict(summary(failed))} failed; retrain {retrained - started:.0f} s; "
              f"{decision['reason']}")
    assert outcomes and not failed, failed[:10]
    assert {o.version for o in outcomes} == {champion, challenger}
    # the champion was gone from both replicas when the retrain returned
    after = Counter(o.version for o in outcomes if o.sent > retrained)
    assert set(after) == {challenger}, after

"""Against a real TorchServe started here, on loopback, serving the trained test model."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from tests.load import Load, send, summary, wait_until
from tests.servers import free_ports, metric_samples, oversize_status, predict
from visionloop.core.capture_store import CaptureStore, image_path
from visionloop.core.drift import latest_readings
from visionloop.core.manifest import ModelManifest
from visionloop.core.preprocess import preprocess_image
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.trainer.data import load_image_tensor
from visionloop.trainer.models import build_model

pytestmark = pytest.mark.slow
BACKENDS = ("torchscript", "onnx")


@pytest.fixture(scope="module")
def torchserve(trained_version: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("torchserve")
    cfg = server.ServerConfig(home=home, model_store=home / "mars", capture_dir=home / "captures",
                              **free_ports())
    models = {f"fm_{b}": package(trained_version, cfg.model_store, b, batch_size=8).name
              for b in BACKENDS}
    pid = server.start(cfg, models)
    yield cfg
    assert server.stop(cfg)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)  # Java is gone, not orphaned


def test_served_predictions_equal_the_in_process_model(torchserve, trained_version,
                                                       small_scenario):
    manifest = ModelManifest.load(trained_version)
    eager = build_model(manifest.arch, len(manifest.classes), "none").model.eval()
    eager.load_state_dict(torch.load(trained_version / "weights.pt", weights_only=True))
    files = sorted((small_scenario / "test").rglob("*.png"))[::50]
    batch = torch.stack([preprocess_image(load_image_tensor(f), manifest.preprocessing)
                         for f in files])
    with torch.no_grad():
        expected = torch.softmax(eager(batch) / manifest.temperature, dim=1)
    for backend in BACKENDS:
        for path, probs in zip(files, expected, strict=True):
            status, reply = predict(torchserve, f"fm_{backend}", path.read_bytes())
            assert status == 200, reply
            served = torch.tensor(reply["probabilities"])
            assert (served - probs).abs().max().item() <= 1e-4, (backend, path.name)
            assert reply["predictions"][0]["label"] == manifest.classes[int(probs.argmax())]
            assert reply["version"] == manifest.version
            assert reply["backend"].startswith("torchscript:" if backend == "torchscript"
                                               else "onnxruntime:")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_input_is_a_4xx_and_the_worker_keeps_serving(torchserve, small_scenario):
    good = next((small_scenario / "test" / "bag").iterdir()).read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(jpeg, "JPEG")
    bad_inputs = {
        "empty body": b"",
        "not an image": b"hello, this is text",
        "truncated JPEG": jpeg.getvalue()[:300],
        "20000x20000 PNG": _png(Image.new("L", (20000, 20000))),
    }
    for backend in BACKENDS:
        for label, body in bad_inputs.items():
            status, reply = predict(torchserve, f"fm_{backend}", body)
            assert 400 <= status < 500, (backend, label, status, reply)
            status, reply = predict(torchserve, f"fm_{backend}", good)
            assert status == 200, (backend, label, reply)
        assert oversize_status(torchserve, f"fm_{backend}", 7_000_000) == 413
        assert predict(torchserve, f"fm_{backend}", good)[0] == 200


def test_good_and_bad_requests_in_one_batch_get_their_own_status(torchserve, small_scenario):
    good = [p.read_bytes() for p in sorted((small_scenario / "test").rglob("*.png"))[:12]]
    bodies = [b if i % 3 else b"garbage" for i, b in enumerate(good)]
    with ThreadPoolExecutor(max_workers=12) as pool:  # concurrent: TorchServe batches them
        results = list(pool.map(lambda body: predict(torchserve, "fm_onnx", body), bodies))
    for i, (status, reply) in enumerate(results):
        assert status == (200 if i % 3 else 400), (i, reply)


def model_samples(cfg: server.ServerConfig, model: str) -> dict[str, list[float]]:
    """The values of each metric of one model on the metrics port, by sample name (the
    parser names a counter's samples <name>_total)."""
    text = urllib.request.urlopen(f"{cfg.url('metrics')}/metrics", timeout=10).read().decode()
    samples: dict[str, list[float]] = {}
    for (name, labels), value in metric_samples(text).items():
        if ("ModelName", model) in labels:
            samples.setdefault(name, []).append(value)
    return samples


def test_uncertain_predictions_are_in_the_capture_store(torchserve, small_scenario):
    store = CaptureStore(torchserve.capture_dir)
    before = len(store.captures())
    counted_before = model_samples(torchserve, "fm_torchscript")
    captured = []
    images = sorted((small_scenario / "pool").iterdir())[:40]
    for path in images:
        status, reply = predict(torchserve, "fm_torchscript", path.read_bytes())
        assert status == 200
        assert reply["captured"] == (reply["uncertainty"]["max_prob"] < 0.7)
        if reply["captured"]:
            captured.append(path.read_bytes())
    assert captured, "no pool image was uncertain enough to capture"
    after = store.captures()
    store.close()
    assert len(after) - before == len(captured)
    by_image = {r.sha: r for r in after}
    for body in captured:
        sha = hashlib.sha256(body).hexdigest()
        assert image_path(torchserve.capture_dir, sha).read_bytes() == body
        assert max(by_image[sha].probabilities) < 0.7

    def added(samples: dict[str, list[float]], name: str) -> float:
        return sum(samples.get(name, [])) - sum(counted_before.get(name, []))

    def counted_this_test() -> dict[str, list[float]] | None:
        now = model_samples(torchserve, "fm_torchscript")
        return now if (added(now, "PredictionConfidence_total") == len(images)
                       and added(now, "CapturedPredictions_total") == len(captured)) else None

    # every reply in the confidence histogram and every capture counted, once; the frontend
    # takes the workers' metrics from their logs, a moment after the reply
    counted = wait_until("the metrics count this test's replies and captures",
                         counted_this_test, timeout=30)
    # exported, and zero: nothing in this module fails a capture or reaches the rate cap
    for name in ("CaptureErrors_total", "CapturesRateLimited_total"):
        assert name in counted and sum(counted[name]) == 0, (name, counted.get(name))
    assert counted["ServedVersion"] == [int(reply["version"].lstrip("v"))], counted


def test_the_traffic_drift_is_read_exported_and_moves_with_the_inputs(
        torchserve, trained_version, small_scenario):
    manifest = ModelManifest.load(trained_version)
    window = manifest.metrics["drift_reference"]["window"]
    tests = sorted((small_scenario / "test").rglob("*.png"))
    random.Random(0).shuffle(tests)  # every class in the window, in the test split's mix
    assert len(tests) >= window

    url = f"{torchserve.url('inference')}/predictions/fm_onnx"

    def stream(bodies: list[bytes]) -> dict:
        """The drift reading the worker writes after this window of traffic."""
        outcomes = Load([url], bodies, threads=4, max_requests=len(bodies)).start().join()
        assert summary(outcomes) == {"HTTP 200": len(bodies)}
        streamed = time.time()  # a reading's written_at is wall-clock time

        def reading_after_the_stream() -> dict | None:
            # a worker writes its reading after a batch, at most once a second: each poll
            # sends one more of the stream's images (the window stays all but a few of it)
            assert send(url, bodies[0]).ok
            newer = [r for r in latest_readings(torchserve.capture_dir, manifest.name)
                     if r["written_at"] > streamed]
            return newer[0] if newer else None

        return wait_until("a drift reading written after the stream",
                          reading_after_the_stream, timeout=60, poll=0.5)

    like_test = stream([p.read_bytes() for p in tests[:window]])
    assert not like_test["drifted"], like_test
    assert like_test["predictions"] == window
    inverted = stream([_png(ImageOps.invert(Image.open(p).convert("L")))
                       for p in tests[:window]])
    assert inverted["distance"] > inverted["distance_threshold"] > like_test["distance"], inverted

    def drift_gauges() -> dict[str, float] | None:
        text = urllib.request.urlopen(f"{torchserve.url('metrics')}/metrics", timeout=10).read()
        gauges = {dict(labels)["Statistic"]: value
                  for (name, labels), value in metric_samples(text.decode()).items()
                  if name == "TrafficDrift" and ("ModelName", "fm_onnx") in labels}
        return gauges if gauges.get("drifted") == 1.0 else None

    # the gauges are the last batch's reading, the inverted stream's (the frontend takes
    # them from the worker's log, a moment after the reply)
    gauges = wait_until("the TrafficDrift gauges export the inverted stream's drift",
                        drift_gauges, timeout=30)
    assert gauges["distance"] > gauges["distance_threshold"], gauges
    print(f"\ndrift: like the test split {like_test['distance']:.1f} (threshold "
          f"{like_test['distance_threshold']:.1f}, mix {like_test['mix']:.3f}); inverted "
          f"{inverted['distance']:.1f} (mix {inverted['mix']:.3f})")


def test_promotion_under_load_drops_no_request(trained_version, small_scenario, tmp_path):
    """v1 serves under continuous load from 4 clients; v2 is promoted; zero failures."""
    from visionloop.serving.promote import promote
    from visionloop.trainer.config import TrainConfig
    from visionloop.trainer.train import run_training

    store = tmp_path / "store"
    shutil.copytree(trained_version, store / "fm" / "v1")
    v2 = run_training(TrainConfig(data=str(small_scenario), out=str(store), name="fm",
                                  parent="v1", learner="finetune", epochs=1, freeze_epochs=0,
                                  num_workers=0, show_progress=False,
                                  work_dir=str(tmp_path / "runs")))
    cfg = server.ServerConfig(home=tmp_path / "ts", model_store=tmp_path / "mars",
                              capture_dir=tmp_path / "captures", **free_ports())
    (tmp_path / "ts").mkdir()
    v1_mar = package(store / "fm" / "v1", cfg.model_store, "onnx").name
    v2_mar = package(v2, cfg.model_store, "onnx").name
    body = next((small_scenario / "test" / "coat").iterdir()).read_bytes()
    server.start(cfg, {"fm": v1_mar})
    try:
        with Load([f"{cfg.url('inference')}/predictions/fm"], [body], threads=4) as load:
            load.wait_for_outcomes(20)  # v1 is serving the load
            assert promote(cfg, "fm", "v2", v2_mar) == ["v1"]
            promoted = time.monotonic()
            load.wait_for_outcomes(20, sent_after=promoted)  # and v2 serves it after
        outcomes = load.outcomes()
    finally:
        server.stop(cfg)
    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{summary(failures)} of {len(outcomes)} requests: {failures[:5]}"
    versions = Counter(o.version for o in outcomes)
    assert set(versions) == {"v1", "v2"} and outcomes[0].version == "v1", versions
    # v1 was unregistered when promote returned: nothing sent after it can reach v1
    after = [o.version for o in outcomes if o.sent > promoted]
    assert after and set(after) == {"v2"}, Counter(after)
    print(f"promotion under load: {len(outcomes)} requests, {versions['v1']} answered by v1, "
          f"{versions['v2']} by v2, 0 failed")

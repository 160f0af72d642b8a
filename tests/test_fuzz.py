"""Fuzzing the request path with real image bytes: every input gets a reply or a 4xx with a
reason, never an exception, a hung request or a dead worker.

In-process, the served functions (decode -> preprocess -> model -> postprocess) for both
artifacts; then the same inputs through a real TorchServe, whose worker must be the same
process at the end. Input counts: VISIONLOOP_FUZZ_EXAMPLES per test (see fuzz_inputs).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given

from tests.fuzz_inputs import EXAMPLES, FUZZ_SETTINGS, request_bodies, seed_images
from tests.servers import free_ports, oversize_status, predict, worker_pids
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.inference import BadInput
from visionloop.serving.offline import InProcessModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seeds(small_scenario: Path) -> dict[str, bytes]:
    return seed_images(next((small_scenario / "pool").glob("*.png")))


@pytest.fixture(scope="module")
def in_process(trained_version: Path) -> dict[str, InProcessModel]:
    return {a: InProcessModel(trained_version, a) for a in ("torchscript", "onnx")}


@pytest.mark.parametrize("artifact", ["torchscript", "onnx"])
def test_in_process_every_input_gets_a_reply_or_a_4xx(in_process, seeds, artifact):
    model = in_process[artifact]
    tried = []

    @FUZZ_SETTINGS
    @given(body=request_bodies(seeds))
    def check(body: bytes) -> None:
        tried.append(len(body))
        started = time.monotonic()
        [result] = model.predict([body])
        assert time.monotonic() - started < 20, f"{len(body)}-byte input took too long"
        if isinstance(result, BadInput):
            assert 400 <= result.status < 500 and result.reason
        else:
            assert abs(sum(result.probabilities) - 1) < 1e-3

    check()
    print(f"in-process {artifact}: {len(tried)} inputs")
    assert len(tried) >= min(EXAMPLES, 100)


@pytest.fixture(scope="module")
def torchserve(trained_version: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("fuzz-torchserve")
    cfg = server.ServerConfig(home=home, model_store=home / "mars", capture_dir=home / "captures",
                              **free_ports())
    server.start(cfg, {"fm": package(trained_version, cfg.model_store, "torchscript").name})
    yield cfg
    assert server.stop(cfg)


def test_through_torchserve_every_input_gets_a_reply_or_a_4xx(torchserve, seeds):
    pids = worker_pids(torchserve, "fm")
    statuses: dict[int, int] = {}

    @FUZZ_SETTINGS
    @given(body=request_bodies(seeds))
    def check(body: bytes) -> None:
        if len(body) > torchserve.max_request_size:  # refused by TorchServe before upload
            status, reply = oversize_status(torchserve, "fm", len(body)), {"error": "413"}
        else:
            status, reply = predict(torchserve, "fm", body)  # 60 s timeout: no hang
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 200 or (400 <= status < 500 and reply.get("error")), (status, reply)

    check()
    print(f"through TorchServe: {sum(statuses.values())} inputs, statuses {statuses}")
    assert predict(torchserve, "fm", seeds["fashion-mnist png (gray)"])[0] == 200
    assert worker_pids(torchserve, "fm") == pids, "a worker died and was restarted"
    assert statuses.get(200) and sum(v for k, v in statuses.items() if k >= 400)

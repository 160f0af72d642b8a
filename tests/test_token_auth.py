"""Token authorisation, when turned on, against a real TorchServe: a request without the
inference key is refused, one with it is answered, and our own management calls (readiness,
promotion) carry the management key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import free_ports, predict
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.promote import default_version

pytestmark = pytest.mark.slow


def test_inference_without_the_key_is_refused(trained_version: Path, small_scenario: Path,
                                              tmp_path: Path):
    cfg = server.ServerConfig(home=tmp_path, model_store=tmp_path / "mars",
                              capture_dir=tmp_path / "captures", token_auth=True, **free_ports())
    mar = package(trained_version, cfg.model_store, "torchscript")
    server.start(cfg, {"fm": mar.name})  # waits for READY through the management key
    try:
        image = next((small_scenario / "test").rglob("*.png")).read_bytes()
        status, body = predict(cfg, "fm", image)
        assert status == 400 and "Token Authorization failed" in body.get("message", "")
        status, body = predict(cfg, "fm", image, {"Authorization": "Bearer not-the-key"})
        assert status == 400
        status, body = predict(cfg, "fm", image, server.auth_headers(cfg, "inference"))
        assert status == 200 and body["version"] == "v1"
        assert server.auth_headers(cfg, "inference") != server.auth_headers(cfg, "management")
        assert default_version(cfg, "fm") == "v1"
        assert server.status(cfg)["models"]["models"][0]["modelName"] == "fm"
    finally:
        assert server.stop(cfg)

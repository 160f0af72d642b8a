"""The serving request path and capture store, without a server."""

import io
import math
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tests.test_manifest_store import make_manifest
from visionloop.serving.inference import BadInput, Limits, decode, postprocess, uncertainty


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_real_photos_in_several_formats():
    photo = Image.fromarray(skdata.astronaut())
    for fmt, channels in (("JPEG", 3), ("PNG", 3), ("WEBP", 3), ("GIF", 3)):
        tensor = decode(encode(photo, fmt))
        assert tensor.dtype == torch.uint8 and tensor.shape[1:] == (512, 512), fmt
        assert tensor.shape[0] in (channels, 1, 4)
    assert decode(encode(photo.convert("L"), "PNG")).shape == (1, 512, 512)


@pytest.mark.parametrize("body, status, reason", [
    (b"", 400, "empty request body"),
    (None, 400, "empty request body"),
    (b"GIF89a but not really", 400, "not a readable image"),
    (b"%PDF-1.4 a document", 400, "not a readable image"),
])
def test_decode_refuses_non_images(body, status, reason):
    with pytest.raises(BadInput, match=reason) as err:
        decode(body)
    assert err.value.status == status


def test_decode_refuses_truncated_bombs_and_oversize():
    jpeg = encode(Image.fromarray(skdata.coffee()), "JPEG")
    png = encode(Image.fromarray(skdata.coffee()), "PNG")
    for truncated in (png[: len(png) // 2], jpeg[:200]):
        with pytest.raises(BadInput) as err:
            decode(truncated)
        assert err.value.status == 400
    bomb = encode(Image.new("L", (20000, 20000)), "PNG")  # 400 Mpx, ~400 KB on the wire
    with pytest.raises(BadInput, match="too large|pixels") as err:
        decode(bomb)
    assert err.value.status == 413
    with pytest.raises(BadInput, match="limit is 1000") as err:
        decode(jpeg, Limits(max_bytes=1000))
    assert err.value.status == 413
    strip = encode(Image.new("L", (4_000_000, 1)), "PNG")  # 4 KB; resized, a 12 GB tensor
    with pytest.raises(BadInput, match="aspect ratio") as err:
        decode(strip)
    assert err.value.status == 400
    assert decode(encode(Image.new("L", (320, 10)), "PNG")).shape == (1, 10, 320)


def test_corrupt_png_deflate_stream_is_a_400_not_a_crash():
    """torchvision's PNG decoder segfaults on this one (bit flip found by the fuzz tests)."""
    png = bytearray(encode(Image.fromarray(skdata.coffee()).resize((96, 96)).convert("P"),
                           "PNG"))
    idat = png.index(b"IDAT") + 4
    png[idat + 40] ^= 0x10  # inside the deflate stream; the chunk CRC no longer matches
    with pytest.raises(BadInput) as err:
        decode(bytes(png))
    assert err.value.status == 400


def test_postprocess_calibrates_with_the_manifest_temperature():
    manifest = make_manifest(temperature=2.0)  # classes ("a", "b")
    reply = postprocess(torch.tensor([[2.0, 0.0]]), manifest, top_k=5)[0].to_dict()
    expected = 1 / (1 + math.exp(-1.0))  # softmax([2, 0] / 2)
    assert reply["predictions"][0] == {"label": "a", "probability": pytest.approx(expected)}
    assert len(reply["predictions"]) == 2 and reply["version"] == "v1"
    assert reply["uncertainty"]["margin"] == pytest.approx(2 * expected - 1, abs=1e-6)


def test_uncertainty_scores_at_the_extremes():
    certain = asdict(uncertainty(torch.tensor([1.0, 0.0, 0.0, 0.0])))
    assert certain == {"max_prob": 1.0, "margin": 1.0, "entropy": pytest.approx(0.0, abs=1e-6)}
    flat = asdict(uncertainty(torch.full((4,), 0.25)))
    assert flat["entropy"] == pytest.approx(1.0) and flat["margin"] == 0.0


def test_serving_settings_come_from_the_environment_over_the_machines_defaults():
    from visionloop.serving.settings import ServingSettings

    assert ServingSettings.for_machine(cpus=2, gpus=0).workers == 1
    assert ServingSettings.for_machine(cpus=16, gpus=0).workers == 4
    assert ServingSettings.for_machine(cpus=16, gpus=2).workers == 2
    tuned = ServingSettings.from_env({"VISIONLOOP_TS_WORKERS": "3", "VISIONLOOP_TS_BATCH_SIZE": "4",
                                      "VISIONLOOP_TS_MAX_BATCH_DELAY_MS": "0",
                                      "VISIONLOOP_TS_JOB_QUEUE_SIZE": "500",
                                      "VISIONLOOP_TS_TOKEN_AUTH": "1"})
    assert (tuned.workers, tuned.batch_size, tuned.max_batch_delay_ms, tuned.job_queue_size,
            tuned.token_auth) == (3, 4, 0, 500, True)
    with pytest.raises(ValueError, match="VISIONLOOP_TS_BATCH_SIZE must be >= 1"):
        ServingSettings.from_env({"VISIONLOOP_TS_BATCH_SIZE": "0"})
    with pytest.raises(ValueError, match="must be an integer"):
        ServingSettings.from_env({"VISIONLOOP_TS_WORKERS": "two"})


def test_the_server_config_and_archives_take_the_settings(tmp_path, monkeypatch):
    from visionloop.serving.server import ServerConfig, write_config

    monkeypatch.setenv("VISIONLOOP_TS_JOB_QUEUE_SIZE", "321")
    monkeypatch.setenv("VISIONLOOP_TS_WORKERS", "2")
    props = write_config(ServerConfig(home=tmp_path)).read_text()
    assert "job_queue_size=321\n" in props and "default_workers_per_model=2\n" in props


def test_in_flight_markers_of_dead_workers_are_not_waited_for(tmp_path):
    import os
    import subprocess
    import sys

    from visionloop.serving.inflight import (
        clear_dead_markers,
        inflight_dir,
        marked,
        running_batches,
    )

    root = inflight_dir(tmp_path, "127.0.0.1:8081")
    with marked(root, "fm", "v1"):
        assert running_batches(tmp_path, "127.0.0.1:8081", "fm", "v1") == 1
        assert running_batches(tmp_path, "127.0.0.1:9999", "fm", "v1") == 0  # another replica
    assert running_batches(tmp_path, "127.0.0.1:8081", "fm", "v1") == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = root / "fm" / "v1" / f"{os.uname().nodename}-{dead}"  # killed mid-batch
    left.touch()
    elsewhere = root / "fm" / "v1" / "another-host-12"  # cannot be checked from here
    elsewhere.touch()
    assert running_batches(tmp_path, "127.0.0.1:8081", "fm", "v1") == 1  # only the other host's
    assert clear_dead_markers(root) == 1 and not left.exists() and elsewhere.exists()
    assert running_batches(tmp_path, "127.0.0.1:8081", "fm", "v1", stale_s=0) == 0

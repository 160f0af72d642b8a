"""The serving request path and capture store, without a server."""

import io
import json
import math
import multiprocessing
import sqlite3
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from core.capture_store import image_path
from core.reply import ClassScore, Prediction, Uncertainty
from serving.capture import CapturePolicy, Capturer
from serving.inference import BadInput, Limits, decode, postprocess, uncertainty
from tests.test_manifest_store import make_manifest


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


def reply(max_prob: float, label: str = "a") -> Prediction:
    return Prediction(model="fm", version="v1", predictions=(ClassScore(label, max_prob),),
                      probabilities=(max_prob, 1 - max_prob),
                      uncertainty=Uncertainty(max_prob, 2 * max_prob - 1, 0.5))


def test_capture_keeps_only_uncertain_predictions_content_addressed(tmp_path):
    store = Capturer(tmp_path, CapturePolicy(max_confidence=0.7))
    assert store.maybe_capture(b"img-1", "r1", reply(0.55))
    assert not store.maybe_capture(b"img-2", "r2", reply(0.95))
    assert store.maybe_capture(b"img-1", "r3", reply(0.6))  # same image, second request
    rows = sqlite3.connect(tmp_path / "captures.sqlite3").execute(
        "SELECT request_id, image_sha256, probabilities FROM captures ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["r1", "r3"] and rows[0][1] == rows[1][1]
    assert image_path(tmp_path, rows[0][1]).read_bytes() == b"img-1"
    assert json.loads(rows[0][2]) == pytest.approx([0.55, 0.45])
    assert len(list((tmp_path / "images").rglob("*"))) == 2  # one folder, one file


def test_capture_rate_cap_and_errors_never_raise(tmp_path):
    store = Capturer(tmp_path / "ok", CapturePolicy(per_minute=3))
    results = [store.maybe_capture(bytes([i]), f"r{i}", reply(0.5)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert store.counts == {"captured": 3, "dropped_rate_limit": 2, "errors": 0}
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the capture directory should be")
    broken = Capturer(blocked)
    assert broken.maybe_capture(b"x", "r", reply(0.5)) is False
    assert broken.counts["errors"] == 1


def test_image_path_refuses_anything_but_a_digest(tmp_path):
    for bad in ("../../etc/passwd", "ab" * 31 + "/x", "Z" * 64):
        with pytest.raises(ValueError, match="not a sha256"):
            image_path(tmp_path, bad)


def _writer(root: str, worker: int, count: int) -> None:
    store = Capturer(root, CapturePolicy(per_minute=10_000))
    for i in range(count):
        assert store.maybe_capture(f"{worker}-{i}".encode(), f"{worker}-{i}", reply(0.5))


def test_concurrent_writers_lose_nothing(tmp_path):
    """Several worker processes capture at once (WAL): every row arrives, integrity holds."""
    processes = [multiprocessing.Process(target=_writer, args=(str(tmp_path), w, 50))
                 for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    conn = sqlite3.connect(tmp_path / "captures.sqlite3")
    assert conn.execute("SELECT count(DISTINCT request_id) FROM captures").fetchone()[0] == 200
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_capture_batch_marks_exactly_the_uncertain_ones(tmp_path):
    store = Capturer(tmp_path, CapturePolicy(max_confidence=0.7, per_minute=2))
    items = [(b"a", "r1", reply(0.9)), (b"b", "r2", reply(0.5)), (b"c", "r3", reply(0.6)),
             (b"d", "r4", reply(0.4))]
    assert store.capture_batch(items) == [False, True, True, False]  # r4: over the rate cap
    assert store.counts == {"captured": 2, "dropped_rate_limit": 1, "errors": 0}
    ids = [r[0] for r in sqlite3.connect(tmp_path / "captures.sqlite3").execute(
        "SELECT request_id FROM captures ORDER BY id")]
    assert ids == ["r2", "r3"]


def test_capture_takes_every_prediction_of_the_always_classes(tmp_path):
    store = Capturer(tmp_path, CapturePolicy(max_confidence=0.7, always_classes=["a"]))
    confident_a = reply(0.99)
    confident_b = reply(0.99, label="b")
    assert store.maybe_capture(b"rare", "r1", confident_a)  # a minority class, confident
    assert not store.maybe_capture(b"common", "r2", confident_b)
    assert CapturePolicy(always_classes=["a"]).always_classes == ("a",)  # from serving.json

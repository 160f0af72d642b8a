"""Labeling's pure parts: query strategies, duplicate detection, the disagreement rule,
the labeling config and the retrain trigger (real subprocess)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from visionloop.core.classes import minority_classes
from visionloop.labeling import server as labelstudio_server
from visionloop.labeling.backend_auth import SECRET_HEADER, authorised
from visionloop.labeling.backend_server import BackendServer
from visionloop.labeling.dedupe import NearDuplicateFilter, thumbnail_signature
from visionloop.labeling.events import RetrainTrigger
from visionloop.labeling.project import config_classes, label_config
from visionloop.labeling.pull import chosen_label
from visionloop.labeling.server import LabelStudioConfig
from visionloop.labeling.strategies import rank

PROBS = np.array([
    [0.90, 0.05, 0.05],  # 0 confident
    [0.40, 0.35, 0.25],  # 1 least confident, small margin
    [0.50, 0.48, 0.02],  # 2 second smallest margin
    [0.34, 0.33, 0.33],  # 3 most uncertain on every score
    [0.55, 0.05, 0.40],  # 4 most minority mass (class 2), fairly confident
])


def test_uncertainty_strategies_rank_the_most_uncertain_first():
    assert rank(PROBS, "least_confidence", budget=2)[:2].tolist() == [3, 1]
    assert rank(PROBS, "margin", budget=2)[:2].tolist() == [3, 2]
    assert rank(PROBS, "entropy", budget=2)[0] == 3
    assert sorted(rank(PROBS, "random", budget=2, seed=1).tolist()) == [0, 1, 2, 3, 4]


def test_class_balanced_reserves_its_share_for_minority_mass():
    order = rank(PROBS, "class_balanced", budget=2, minority=[2], minority_share=0.5)
    # one place (ceil(0.5 * 2)) for the highest class-2 mass, then least confidence
    assert order.tolist() == [4, 3, 1, 2, 0]
    assert rank(PROBS, "class_balanced", budget=2, minority=[]).tolist() == \
        rank(PROBS, "least_confidence", budget=2).tolist()
    with pytest.raises(ValueError, match="unknown strategy"):
        rank(PROBS, "bald", budget=2)


def test_minority_boundary_takes_both_sides_of_each_minority_decision():
    probs = np.array([
        [0.60, 0.30, 0.10],  # 0 called class 0; class 2 well below
        [0.20, 0.20, 0.60],  # 1 called class 2, far above its boundary
        [0.50, 0.45, 0.05],  # 2 nearest class 1's boundary, below it
        [0.90, 0.05, 0.05],  # 3 confident majority
        [0.48, 0.04, 0.48],  # 4 on class 2's boundary
    ])
    # class 2: the nearest above (4), the nearest below (0); then least confidence
    assert rank(probs, "minority_boundary", budget=3, minority=[2],
                minority_share=0.5).tolist() == [4, 0, 2, 1, 3]
    # round-robin over (class, side); class 1 is never predicted (cold start): its
    # below side still gives the image nearest its boundary
    assert rank(probs, "minority_boundary", budget=3, minority=[1, 2],
                minority_share=1.0)[:3].tolist() == [2, 4, 0]
    assert sorted(rank(probs, "minority_boundary", budget=5, minority=[1, 2],
                       minority_share=1.0).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="minority share"):
        rank(probs, "minority_boundary", budget=3, minority=[2], minority_share=1.5)


def test_minority_rule_is_half_the_median():
    assert minority_classes({"a": 100, "b": 90, "c": 40, "d": 10}) == ["d"]
    assert minority_classes({"a": 10, "b": 10}) == []


def _jpeg(image: Image.Image, quality: int = 70) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_near_duplicates_are_caught_and_distinct_images_kept(small_scenario: Path):
    files = sorted((small_scenario / "pool").rglob("*.png"))[:40]
    originals = [Image.open(f).convert("L") for f in files]
    dedupe = NearDuplicateFilter()
    kept = [dedupe.offer(str(i), thumbnail_signature(f.read_bytes())) is None
            for i, f in enumerate(files)]
    assert sum(kept) >= 36  # distinct real garments are (almost all) not duplicates
    first_kept = kept.index(True)
    brighter = ImageEnhance.Brightness(originals[first_kept]).enhance(1.1)
    for copy in (_jpeg(originals[first_kept]), _jpeg(brighter)):
        assert dedupe.offer("copy", thumbnail_signature(copy)) == str(first_kept)


def _annotation(choice: str, updated: str, cancelled=False, ground_truth=False) -> dict:
    return {"was_cancelled": cancelled, "ground_truth": ground_truth, "updated_at": updated,
            "result": [{"from_name": "label", "value": {"choices": [choice]}}]}


def test_disagreements_follow_the_documented_rule():
    majority = [_annotation("coat", "2026-01-01"), _annotation("shirt", "2026-01-03"),
                _annotation("coat", "2026-01-02")]
    assert chosen_label(majority)[:3] == ("coat", 3, pytest.approx(2 / 3))
    tie = [_annotation("coat", "2026-01-01"), _annotation("shirt", "2026-01-02")]
    assert chosen_label(tie)[0] == "shirt"  # newest of the tied answers
    truth = majority + [_annotation("bag", "2025-12-01", ground_truth=True)]
    assert chosen_label(truth)[0] == "bag"
    assert chosen_label([_annotation("coat", "2026-01-01", cancelled=True)]) is None


def test_label_config_offers_exactly_the_model_classes():
    classes = ("t-shirt_top", "coat", 'odd "name" & <more>')
    assert config_classes(label_config(classes)) == list(classes)


def test_retrain_trigger_runs_the_command_in_the_background(tmp_path: Path):
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ok')"]
    trigger = RetrainTrigger(tmp_path / "events.json", threshold=3, command=command)
    assert [trigger.record("ANNOTATION_CREATED") for _ in range(3)] == [False, False, True]
    trigger.wait(30)
    assert marker.read_text() == "ok"
    again = RetrainTrigger(tmp_path / "events.json", threshold=3, command=command)
    assert again.state["events"]["ANNOTATION_CREATED"] == 3  # survives a restart
    assert again.state["triggers"] == 1 and again.state["last_exit_code"] == 0
    # Label Studio's "Start Training" starts it at once, below the threshold
    marker.unlink()
    assert again.record("START_TRAINING") is True
    again.wait(30)
    assert marker.read_text() == "ok" and again.state["triggers"] == 2
    assert again.state["since_trigger"] == 0  # not an annotation: the count is untouched
    again.refuse("/webhook")
    assert RetrainTrigger(tmp_path / "events.json", 3, None).state["unauthorised"] == \
        {"/webhook": 1}


def test_the_backend_secret_comes_as_basic_auth_or_our_header():
    secret = "s" * 32
    basic = "Basic " + base64.b64encode(f"anyone:{secret}".encode()).decode()
    assert authorised({"Authorization": basic}, secret)
    assert authorised({SECRET_HEADER: secret}, secret)
    assert not authorised({}, secret)
    assert not authorised({SECRET_HEADER: secret[:-1]}, secret)
    assert not authorised({"Authorization": "Basic !!not-base64"}, secret)
    assert not authorised({"Authorization": f"Bearer {secret}"}, secret)
    with pytest.raises(ValueError, match="at least 16"):
        BackendServer(("127.0.0.1", 0), None, RetrainTrigger(Path("/nonexistent/e.json"), 1,
                                                              None), "short")


def test_credentials_made_before_the_backend_secret_gain_one(tmp_path: Path):
    cfg = LabelStudioConfig(data_dir=tmp_path / "ls")
    cfg.data_dir.mkdir()
    cfg.credentials_file.write_text(json.dumps({"password": "p", "token": "t" * 40,
                                                "secret_key": "k"}))
    creds = labelstudio_server.credentials(cfg)
    assert creds["token"] == "t" * 40 and len(creds["backend_secret"]) >= 32
    assert labelstudio_server.credentials(cfg) == creds  # made once
    assert stat.S_IMODE(cfg.credentials_file.stat().st_mode) == 0o600


def test_small_images_get_an_enlarged_display_copy_of_the_same_pixels(tmp_path: Path):
    from visionloop.core.capture_store import image_path
    from visionloop.labeling.display import MIN_SIDE, display_image

    small = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "L")
    big = Image.new("RGB", (MIN_SIDE, 80))
    shas = []
    for image in (small, big):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        image_path(tmp_path, sha).parent.mkdir(parents=True, exist_ok=True)
        image_path(tmp_path, sha).write_bytes(buf.getvalue())
        shas.append(sha)
    shown = display_image(tmp_path, shas[0])
    assert shown != image_path(tmp_path, shas[0]) and shown.suffix == ".png"
    with Image.open(shown) as enlarged:
        assert enlarged.size == (84, 84)  # x3, the smallest whole factor reaching 64
        assert np.array_equal(np.asarray(enlarged)[::3, ::3], np.asarray(small))
    assert display_image(tmp_path, shas[0]) == shown  # made once
    assert display_image(tmp_path, shas[1]) == image_path(tmp_path, shas[1])  # large enough

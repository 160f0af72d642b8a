"""core.drift: the measure stays under its thresholds on traffic like the reference's, and
crosses them when the inputs or the class mix move."""

from __future__ import annotations

import numpy as np

from visionloop.core.drift import (
    DriftReference,
    centred,
    fit_reference,
    logits_from_probabilities,
    read,
)

CLASSES = 5


def logits_like(rng: np.random.Generator, labels: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """Logits that point at their class (a centre per class, unit noise), moved by offset
    along a direction a softmax sees (adding the same to every logit it would not)."""
    centres = 4.0 * np.eye(CLASSES)
    direction = np.array([1.0, -1.0, 1.0, -1.0, 0.0])
    return centres[labels] + rng.normal(size=(len(labels), CLASSES)) + offset * direction


def long_tailed(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(CLASSES, n, p=[0.4, 0.3, 0.2, 0.07, 0.03])


def test_unshifted_traffic_rarely_alarms_and_shifted_traffic_does():
    rng = np.random.default_rng(0)
    val_y, test_y = long_tailed(rng, 600), long_tailed(rng, 2000)
    reference = fit_reference(logits_like(rng, val_y), val_y, logits_like(rng, test_y),
                              window=100)
    same = [read(reference, logits_like(rng, long_tailed(rng, 100))).drifted
            for _ in range(300)]
    assert sum(same) / len(same) < 0.05  # ~1% by construction
    moved = [read(reference, logits_like(rng, long_tailed(rng, 100), offset=1.5)).drifted
             for _ in range(50)]
    assert all(moved)
    balanced = [read(reference, logits_like(rng, rng.choice(CLASSES, 100))) for _ in range(50)]
    assert all(r.mix > r.mix_threshold for r in balanced)


def test_one_odd_image_cannot_flag_a_window():
    rng = np.random.default_rng(3)
    val_y, test_y = long_tailed(rng, 600), long_tailed(rng, 2000)
    reference = fit_reference(logits_like(rng, val_y), val_y, logits_like(rng, test_y),
                              window=100)
    window = logits_like(rng, long_tailed(rng, 100))
    assert not read(reference, window).drifted
    window[0] = 1e3 * np.array([1.0, -1.0, 1.0, -1.0, 0.0])  # distance ~1e6 uncapped
    assert not read(reference, window).drifted


def test_a_shift_smaller_than_the_margin_does_not_alarm_though_beyond_the_noise():
    """Windows of 400 are precise enough for a +9% mean distance to cross the bootstrap
    quantile half the time; the margin (+20%) keeps it quiet."""
    rng = np.random.default_rng(3)
    val_y, test_y = long_tailed(rng, 600), long_tailed(rng, 4000)
    val, test = logits_like(rng, val_y), logits_like(rng, test_y)
    reference = fit_reference(val, val_y, test, window=400)
    noise_only = fit_reference(val, val_y, test, window=400, margin=0.0)
    assert reference.distance_threshold >= 1.2 * reference.reference_distance
    windows = [logits_like(rng, long_tailed(rng, 400), offset=0.3) for _ in range(100)]
    grown = np.mean([read(reference, w).distance for w in windows]) / reference.reference_distance
    assert 1.05 < grown < 1.15, grown
    assert np.mean([read(reference, w).drifted for w in windows]) <= 0.05
    assert np.mean([read(noise_only, w).drifted for w in windows]) >= 0.3


def test_a_reference_made_before_the_cap_still_reads():
    rng = np.random.default_rng(4)
    y = long_tailed(rng, 400)
    old = fit_reference(logits_like(rng, y), y, logits_like(rng, y), window=50).to_dict()
    del old["distance_cap"], old["reference_distance"]
    reading = read(DriftReference.from_dict(old), logits_like(rng, long_tailed(rng, 50)))
    assert reading.predictions == 50 and np.isfinite(reading.distance)


def test_logits_come_back_from_calibrated_probabilities():
    rng = np.random.default_rng(2)
    logits = logits_like(rng, long_tailed(rng, 20))
    e = np.exp((logits - logits.max(axis=1, keepdims=True)) / 1.7)
    recovered = logits_from_probabilities(e / e.sum(axis=1, keepdims=True), 1.7)
    assert np.allclose(recovered, centred(logits), atol=1e-6)


def test_the_reference_round_trips_and_reads_the_last_window():
    rng = np.random.default_rng(1)
    y = long_tailed(rng, 400)
    reference = fit_reference(logits_like(rng, y), y, logits_like(rng, y), window=50)
    again = DriftReference.from_dict(reference.to_dict())
    stream = np.concatenate([logits_like(rng, long_tailed(rng, 500), offset=3.0),
                             logits_like(rng, long_tailed(rng, 50))])
    reading = read(again, stream)
    assert reading == read(reference, stream[-50:])  # only the recent window counts
    assert reading.predictions == 50
    assert reading.distance < read(reference, stream[:500]).distance / 2


def test_retrain_sees_a_fresh_drifted_reading_only(tmp_path):
    import json
    import time

    from visionloop.configs import RetrainConfig
    from visionloop.core.drift import drift_dir
    from visionloop.retrain import traffic_drifted

    cfg = RetrainConfig(name="fm", capture_dir=tmp_path)
    assert not traffic_drifted(cfg)  # no worker has written one
    folder = drift_dir(tmp_path)
    folder.mkdir()
    now = time.time()
    for name, model, drifted, written in (("fm-11", "fm", False, now),
                                          ("fm-large-12", "fm-large", True, now),
                                          ("fm-13", "fm", True, now - 7200)):
        (folder / f"{name}.json").write_text(json.dumps(
            {"model": model, "drifted": drifted, "written_at": written}))
    assert not traffic_drifted(cfg)  # another model's, and an old one, do not count
    (folder / "fm-14.json").write_text(json.dumps({"model": "fm", "drifted": True,
                                                   "written_at": now}))
    assert traffic_drifted(cfg)

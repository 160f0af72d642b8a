"""One way to configure every command: flag > environment > config file > default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from visionloop import settings
from visionloop.cli import apply_settings, build_parser, main
from visionloop.labeling.server import LabelStudioConfig


def parsed(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None):
    for name in [n for n in __import__("os").environ if n.startswith("VISIONLOOP_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_settings(parser, args)
    return args


def test_a_shared_setting_has_one_default_and_one_variable_in_every_command():
    tree = build_parser().settings_tree
    seen: dict[str, tuple] = {}
    for path, found in tree.items():
        if path == ("demo",):  # the demo's settings describe its own run, on its own data
            continue
        for setting in found:
            if not setting.shared:
                continue
            default = None if setting.default is None else str(setting.default)
            if setting.key in seen:
                assert default == seen[setting.key][0], \
                    f"{setting.key}: {path} vs {seen[setting.key][1]}"
            else:
                seen[setting.key] = (default, path)
    assert {"name", "store", "data", "capture_dir", "labels_dir", "torchserve_home",
            "torchserve_model_store", "labelstudio_url"} <= set(seen)
    assert seen["name"][0] == "classifier"


def test_every_option_has_a_help_text_that_names_its_variable():
    for path, found in build_parser().settings_tree.items():
        for setting in found:
            text = setting.action.help or ""
            assert f"${setting.env}" in text, (path, setting.key, text)
            assert text.split(" [$")[0] != setting.key.replace("_", " "), \
                f"{' '.join(path)} --{setting.key}: the help only repeats the name"


def test_flag_beats_environment_beats_file_beats_default(tmp_path, monkeypatch):
    config = tmp_path / "loop.yaml"
    config.write_text("name: birds\nstore: /srv/store\nretrain:\n  min_new_labels: 7\n"
                      "  max_macro_f1_drop: 0.02\nlabel:\n  budget: 30\n")
    args = parsed(["retrain", "--config", str(config), "--name", "cats"], monkeypatch,
                  {"VISIONLOOP_RETRAIN_MIN_NEW_LABELS": "9"})
    assert args.name == "cats"                      # flag
    assert args.min_new_labels == 9                 # environment over the file's 7
    assert args.max_macro_f1_drop == 0.02           # file
    assert args.store == Path("/srv/store")         # file, shared key at the top
    assert args.eval_per_class is None and args.learner == "champion"  # defaults
    # a required flag can come from the file; the shared name reaches every command
    push = parsed(["label", "push", "--config", str(config)], monkeypatch)
    assert push.budget == 30 and push.name == "birds"
    # the file can also be named by the environment
    train = parsed(["train", "--data", "x"], monkeypatch, {"VISIONLOOP_CONFIG": str(config)})
    assert train.name == "birds" and train.out == "/srv/store"


def test_values_from_the_environment_and_file_are_checked_like_flags(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("VISIONLOOP_TRAIN_LEARNER", "bogus")
    assert main(["train", "--data", str(tmp_path)]) == 2
    assert "learner must be one of auto, finetune, head, got 'bogus'" in capsys.readouterr().err
    monkeypatch.delenv("VISIONLOOP_TRAIN_LEARNER")
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  leraner: head\n")
    assert main(["train", "--data", str(tmp_path), "--config", str(config)]) == 2
    assert "unknown setting(s) ['leraner']" in capsys.readouterr().err
    assert main(["label", "push"]) == 2
    assert "--budget is required" in capsys.readouterr().err


def test_visionloop_config_shows_each_value_and_where_it_came_from(tmp_path):
    config = tmp_path / "loop.yaml"
    config.write_text("name: birds\nretrain:\n  min_new_labels: 7\n")
    shown = subprocess.run([sys.executable, "-m", "visionloop.cli", "config", "retrain",
                            "--config", str(config)], capture_output=True, text=True,
                           timeout=60, env={"PATH": "/usr/bin", "VISIONLOOP_RETRAIN_SEED": "3"})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "retrain:"
    assert f"  name: birds    # file {config}; $VISIONLOOP_NAME" in lines
    assert f"  min_new_labels: 7    # file {config}; $VISIONLOOP_RETRAIN_MIN_NEW_LABELS" in lines
    assert "  seed: 3    # $VISIONLOOP_RETRAIN_SEED; $VISIONLOOP_RETRAIN_SEED" in lines
    assert "  learner: champion    # default; $VISIONLOOP_RETRAIN_LEARNER" in lines


def test_label_studio_url_and_key_use_the_sdk_names(monkeypatch):
    args = parsed(["label", "pull"], monkeypatch, {"LABEL_STUDIO_URL": "https://ls.example:8443/"})
    assert args.labelstudio_url == "https://ls.example:8443/"
    from visionloop.labeling.cli import server_config

    cfg = server_config(args)
    assert cfg.url == "https://ls.example:8443"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k" * 40)
    from visionloop.labeling.server import api_token

    assert api_token(cfg) == "k" * 40
    with pytest.raises(ValueError, match="http"):
        LabelStudioConfig(external_url="ftp://ls.example")


def test_the_shared_names_are_settings_of_some_command():
    keys = {s.key for found in build_parser().settings_tree.values() for s in found}
    assert set(settings.SHARED) <= keys

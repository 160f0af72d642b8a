"""Errors a user can act on, each caused for real: one line on stderr saying what and how to
fix it, its documented exit code, no traceback, and nothing changed by the command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.photos import write_class_folders
from visionloop import cli
from visionloop.core.errors import EXIT_CODES
from visionloop.core.ports import free_loopback_ports

VISIONLOOP = str(Path(sys.executable).with_name("visionloop"))


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("VISIONLOOP_", "LABEL_STUDIO_"))}
    return subprocess.run([VISIONLOOP, *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})}, cwd=cwd)


def user_error(result: subprocess.CompletedProcess, code: int, *says: str) -> str:
    """The error line, checked: the exit code, the last line of stderr, the only error line,
    no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("visionloop ") and ": error: " in last, last
    assert [line for line in result.stderr.splitlines() if ": error: " in line] == [last]
    for text in says:
        assert text in last, last
    print(f"exit {code}: {last}")
    return last


def test_every_exit_code_is_documented_in_the_help_and_the_readme():
    shown = run("--help").stdout
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"  {code}  {meaning}" in shown
        assert f"\n| {code} |" in readme


def test_a_missing_or_empty_data_folder(tmp_path):
    store = tmp_path / "store"
    user_error(run("train", "--data", str(tmp_path / "nowhere"), "--store", str(store)), 2,
               "no such folder", "--data")
    (tmp_path / "empty").mkdir()
    user_error(run("train", "--data", str(tmp_path / "empty"), "--store", str(store)), 2,
               "neither a train/ folder nor class folders")
    assert not store.exists()  # nothing was written


def test_unreadable_images_name_the_files_and_the_way_out(tmp_path):
    photos = write_class_folders(tmp_path / "photos")
    broken = photos["cat"][0]
    broken.write_bytes(broken.read_bytes()[:300])  # a transfer cut short
    result = run("train", "--data", str(tmp_path / "photos"), "--store", str(tmp_path / "s"))
    line = user_error(result, 2, "1 unreadable image(s)", str(broken), "--on-corrupt skip")
    assert len(line) < 2000
    assert not (tmp_path / "s").exists()


def test_too_few_images_to_split_a_class(tmp_path):
    photos = write_class_folders(tmp_path / "photos")
    for extra in photos["rocket"][2:]:
        extra.unlink()
    user_error(run("train", "--data", str(tmp_path / "photos"), "--store", str(tmp_path / "s")),
               2, "at least 3 images per class", "'rocket': 2")


def test_a_metrics_port_without_a_schedule(tmp_path):
    """A one-off run has nothing to scrape: --metrics-port belongs with --every."""
    for command in (["label", "push", "--name", "fm", "--budget", "3"],
                    ["retrain", "--name", "fm", "--data", str(tmp_path)]):
        user_error(run(*command, "--metrics-port", "9100"), 2, "give --every too")


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a model store but the lock a writer takes (an empty file, left behind)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".retrain.lock"}


def test_torchserve_down_changes_nothing(trained_version, tmp_path):
    # a copy of the session's store: a promotion writes into the store it is given
    store = tmp_path / "store"
    shutil.copytree(trained_version.parent, store / trained_version.parent.name)
    before = store_files(store)
    (port,) = free_loopback_ports(1)
    mars = tmp_path / "mars"
    result = run("promote", trained_version.name, "--name", trained_version.parent.name,
                 "--store", str(store), "--torchserve-home", str(tmp_path / "ts"),
                 "--torchserve-model-store", str(mars), "--management-port", str(port))
    user_error(result, 3, f"http://127.0.0.1:{port}", "does not answer", "visionloop serve start")
    assert not mars.exists() or not list(mars.iterdir())  # nothing packaged
    assert store_files(store) == before  # no CHAMPION record, no decision logged


def test_java_missing(tmp_path):
    result = run("serve", "start", "--torchserve-home", str(tmp_path / "ts"),
                 env={"PATH": str(tmp_path / "empty-bin"), "JAVA_HOME": ""})
    user_error(result, 7, "TorchServe needs Java 11 or newer", "openjdk-17-jre-headless")
    assert not (tmp_path / "ts" / "tmp").exists()


def test_label_studio_unreachable(trained_version, tmp_path):
    (port,) = free_loopback_ports(1)
    result = run("label", "pull", "--name", trained_version.parent.name,
                 "--store", str(trained_version.parent.parent), "--labels-dir",
                 str(tmp_path / "labels"),
                 env={"LABEL_STUDIO_URL": f"http://127.0.0.1:{port}",
                      "LABEL_STUDIO_API_KEY": "0" * 40})
    user_error(result, 3, f"Label Studio at http://127.0.0.1:{port}", "unreachable",
               "nothing lost")


def test_label_studio_refuses_the_key(labelstudio, trained_version, tmp_path):
    result = run("label", "pull", "--name", trained_version.parent.name,
                 "--store", str(trained_version.parent.parent), "--labels-dir",
                 str(tmp_path / "labels"),
                 env={"LABEL_STUDIO_URL": labelstudio.url, "LABEL_STUDIO_API_KEY": "f" * 40})
    user_error(result, 6, "refused the API key (401)", "LABEL_STUDIO_API_KEY")
    assert not (tmp_path / "labels").exists()


def test_disk_full(tmp_path):
    """A real full filesystem: a 2 MB tmpfs (needs root, as the rest of the suite's set-up)."""
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr}"
    try:
        result = run("data", "fashion-mnist", "--out", str(full / "fm"),
                     "--minority", "coat,sandal,bag")
        user_error(result, 8, "no space left on the disk", "free some space")
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_bug_keeps_its_traceback_and_debug_shows_a_user_errors(monkeypatch, tmp_path,
                                                                 capsys):
    def broken(args):
        raise ValueError("an index off by one")  # a bug: not a UserError

    commands = [(n, h, a, broken if n == "data" else r) for n, h, a, r in cli.COMMANDS]
    monkeypatch.setattr(cli, "COMMANDS", tuple(commands))
    with pytest.raises(ValueError, match="off by one"):
        cli.main(["data", "fashion-mnist", "--out", str(tmp_path), "--minority", "coat"])
    debug = run("--debug", "train", "--data", str(tmp_path / "nowhere"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("visionloop train: error:")

"""The project as a stranger installs it: the wheel, in a clean virtualenv (torch from the
pinned wheels), no extras, then the extra a command asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.photos import write_class_folders

ROOT = Path(__file__).resolve().parents[1]


def run_in(*command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run outside the checkout: its folders must not be what gets imported."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.install
def test_the_wheel_installs_alone_and_names_the_extra_a_command_needs(tmp_path):
    sh = partial(run_in, cwd=tmp_path)
    ok(sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
          str(ROOT)))
    (wheel,) = (tmp_path / "dist").glob("visionloop-*.whl")
    venv = tmp_path / "venv"
    ok(sh(sys.executable, "-m", "venv", str(venv)))
    pip, bin_dir = str(venv / "bin" / "pip"), venv / "bin"
    ok(sh(pip, "install", "-q", "torch==2.14.1", "torchvision==0.29.1"))  # never resolved
    ok(sh(pip, "install", "-q", str(wheel)))
    ok(sh(pip, "check"))
    assert ok(sh(str(bin_dir / "visionloop"), "--version")).strip() == "visionloop 0.1.0"
    # one import name: none of the stage folders is a top-level package of its own
    found = ok(sh(str(bin_dir / "python"), "-c",
                  "import importlib.util as u; print([n for n in ('core', 'trainer', 'serving', "
                  "'labeling') if u.find_spec(n)], u.find_spec('visionloop.trainer.train') "
                  "is not None)"))
    assert found.strip() == "[] True"

    photos = write_class_folders(tmp_path / "photos")
    train = [str(bin_dir / "visionloop"), "train", "--data", str(tmp_path / "photos"),
             "--store", str(tmp_path / "store"), "--learner", "head", "--image-size", "32",
             "--embedding-cache", str(tmp_path / "embeddings")]
    refused = sh(*train)
    assert refused.returncode == 7, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "visionloop train: error: checking the ONNX export against the model needs the "
        "Python package onnxruntime, which is not installed. install it with: pip install "
        "'visionloop[cpu]' (or 'visionloop[gpu]' on a CUDA host)")
    assert not (tmp_path / "store").exists()

    ok(sh(pip, "install", "-q", f"{wheel}[cpu]"))
    trained = ok(sh(*train))
    version = Path(trained.strip().splitlines()[-1])
    assert version.name == "v1" and (version / "model.onnx").is_file()
    assert sorted(photos) == sorted(
        json.loads((version / "manifest.json").read_text())["classes"])

"""The README's "Your own images" section, run as written: its shell blocks, in order, on real
photos in every format a folder of photos holds, with a real TorchServe and a real Label
Studio; the annotator between the two blocks answers through Label Studio's API."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.photos import write_class_folders, write_unlabelled
from visionloop.core.ports import free_loopback_ports
from visionloop.labeling.pull import review_report

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Your own images"


def readme_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)


def json_documents(text: str) -> list:
    """Every JSON value that starts a line of a command's output."""
    decoder, found, at = json.JSONDecoder(), [], 0
    for line in text.splitlines(keepends=True):
        if line.lstrip()[:1] in ("{", "[") and line[:1] in ("{", "["):
            try:
                found.append(decoder.raw_decode(text, at)[0])
            except json.JSONDecodeError:
                pass
        at += len(line)
    return found


def run_session(blocks: list[str], between: str, home: Path, env: dict[str, str],
                ports: dict[str, int]) -> str:
    """The blocks in one shell, as a user types them, with `between` (the annotator) run
    where the README says to label; the test's free ports instead of the default ones."""
    script = f"{blocks[0]}\n{between}\n{blocks[1]}"
    script = (script.replace("127.0.0.1:8080", f"127.0.0.1:{ports['inference']}")
              .replace("127.0.0.1:8081", f"127.0.0.1:{ports['management']}"))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=home, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"{script}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


# The annotator: every task of the project answered with its image's true label, through
# Label Studio's API, as a person would in the browser.
ANNOTATOR = """
import json, sys
from label_studio_sdk import LabelStudio
from visionloop.labeling.project import FROM_NAME, TO_NAME
truth = json.load(open(sys.argv[1]))
token = json.load(open("runs/labelstudio/credentials.json"))["token"]
client = LabelStudio(base_url=f"http://127.0.0.1:{sys.argv[2]}", api_key=token)
(project,) = [p for p in client.projects.list() if p.title == "visionloop photos"]
answered = 0
for task in client.tasks.list(project=project.id, fields="all"):
    client.annotations.create(id=task.id, result=[{
        "from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
        "value": {"choices": [truth[task.data["capture_sha"]]]}}])
    answered += 1
print(json.dumps({"answered": answered}))
"""


def stop_servers(workdir: Path, env: dict[str, str]) -> None:
    """Whatever the session left running, stopped by its pid file."""
    visionloop = str(Path(sys.executable).with_name("visionloop"))
    for command in (["serve", "stop"], ["labelstudio", "stop"]):
        subprocess.run([visionloop, *command], cwd=workdir, env=env, capture_output=True,
                       timeout=120)


@pytest.mark.slow
@pytest.mark.e2e
def test_the_readme_walkthrough_runs_as_written_on_real_photos(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) == 2, "the walkthrough has two shell blocks, labelling between them"
    home = tmp_path / "home"
    labelled = write_class_folders(home / "photos" / "labelled")
    unlabelled = write_unlabelled(home / "photos" / "unlabelled", 40)
    truth = {hashlib.sha256(path.read_bytes()).hexdigest(): name
             for path, name in unlabelled.items()}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    inference, management, metrics, grpc, grpc_management, ls_port = free_loopback_ports(6)
    ports = {"inference": inference, "management": management}
    env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LANG": "C.UTF-8",
           # the default ports may be taken on a shared box: the same settings, elsewhere
           "VISIONLOOP_SERVE_INFERENCE_PORT": str(inference),
           "VISIONLOOP_MANAGEMENT_PORT": str(management),
           "VISIONLOOP_SERVE_METRICS_PORT": str(metrics),
           "VISIONLOOP_SERVE_GRPC_INFERENCE_PORT": str(grpc),
           "VISIONLOOP_SERVE_GRPC_MANAGEMENT_PORT": str(grpc_management),
           "VISIONLOOP_LABELSTUDIO_PORT": str(ls_port),
           # two of the six learners: the others add ~1.5 min and nothing to check here
           "VISIONLOOP_TRAIN_CANDIDATES": "head,multiblock_head"}
    (tmp_path / "annotate.py").write_text(ANNOTATOR)
    annotate = f"{sys.executable} {tmp_path / 'annotate.py'} {tmp_path / 'truth.json'} {ls_port}"
    workdir = home / "visionloop-photos"
    try:
        output = run_session(blocks, annotate, home, env, ports)
        manifest = json.loads((workdir / "model_store" / "photos" / "v1" / "manifest.json")
                              .read_text())
        made = manifest["metrics"]["splits_made"]
        assert made["counts"] == {"train": 25, "val": 5, "test": 5}, made
        assert manifest["classes"] == sorted(labelled)
        documents = json_documents(output)
        replies = [d for d in documents if isinstance(d, dict) and "predictions" in d]
        assert len(replies) == len(unlabelled), output[-3000:]  # every format got an answer
        assert all(r["version"] == "v1" for r in replies)
        pushed = next(d for d in documents if isinstance(d, dict) and "pushed" in d)
        assert pushed["pushed"] == 20, pushed
        assert {"answered": 20} in documents
        decision = next(d for d in documents if isinstance(d, dict) and "promoted" in d)
        # answers the model contradicts went back to Label Studio for review and wait
        reviews = review_report(workdir / "labels")
        assert decision["new_labels"] == 20 - reviews["waiting"] and decision["champion"] == "v1"
        assert decision["promoted"], decision["reason"]
        served = next(d for d in documents
                      if isinstance(d, list) and d and "modelVersion" in d[0])
        assert served[0]["modelVersion"] == "v2"
        print(f"walkthrough: {len(replies)} images answered, {pushed['pushed']} tasks, "
              f"{reviews['waiting']} sent back for review, retrain: {decision['reason']}")
    finally:
        stop_servers(workdir, env)

"""Security defaults, checked on the real servers and files: every socket TorchServe and Label
Studio listen on is loopback; model archives that would unpack outside their directory are
refused before TorchServe sees them; no secret reaches a log, a manifest or the repo.
(Token auth on the inference API: tests/test_token_auth.py. Size and pixel limits:
tests/test_torchserve.py. Capture ids: tests/test_serving_functions.py. ImageFolder links
out of the tree: tests/test_data.py. Class and artifact names: tests/test_manifest_store.py.)
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.servers import free_ports
from visionloop.labeling import server as labelstudio_server
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.archive_check import ArchiveError, check_archive

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # stat: pid (comm) state ppid pgrp ...
                pids.append(int(entry.name))
    return pids


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        with_fds = Path(f"/proc/{pid}/fd")
        for fd in with_fds.iterdir() if with_fds.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw[:width])), int(hex_port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def test_torchserve_listens_on_loopback_only(trained_version, tmp_path):
    cfg = server.ServerConfig(home=tmp_path / "ts", model_store=tmp_path / "mars",
                              capture_dir=tmp_path / "captures", **free_ports())
    pid = server.start(cfg, {"fm": package(trained_version, cfg.model_store, "onnx").name})
    try:
        sockets = listening_addresses(process_group(os.getpgid(pid)) + [pid])
    finally:
        server.stop(cfg)
    ports = {cfg.inference_port, cfg.management_port, cfg.metrics_port,
             cfg.grpc_inference_port, cfg.grpc_management_port}
    assert ports <= {port for _, port in sockets}, sockets
    assert all(is_loopback(address) for address, _ in sockets), sockets


def test_label_studio_listens_on_loopback_only_and_keeps_its_secrets(labelstudio):
    pid = labelstudio_server.read_pid(labelstudio)
    sockets = listening_addresses(process_group(pid))
    assert labelstudio.port in {port for _, port in sockets}, sockets
    assert all(is_loopback(address) for address, _ in sockets), sockets

    creds = labelstudio_server.credentials(labelstudio)
    assert stat.S_IMODE(labelstudio.credentials_file.stat().st_mode) == 0o600
    secrets = [creds["token"], creds["password"], creds["backend_secret"],
               *(v for user in creds.get("annotators", {}).values() for v in user.values())]
    status = subprocess.run([sys.executable, "-m", "visionloop.cli", "labelstudio", "status",
                             "--labelstudio-dir", str(labelstudio.data_dir),
                             "--labelstudio-port", str(labelstudio.port)],
                            capture_output=True, text=True, timeout=120)
    for text in (labelstudio.log_file.read_text(errors="replace"), status.stdout, status.stderr):
        assert not any(secret in text for secret in secrets)


def test_no_secrets_in_the_repository_or_a_manifest(trained_version):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    forbidden = {".env", "credentials.json", "key_file.json", "labels.sqlite3"}
    assert not [f for f in tracked if Path(f).name in forbidden]
    manifest = (trained_version / "manifest.json").read_text().lower()
    assert not any(word in manifest for word in ("token", "password", "secret_key"))


def evil_archive(path: Path, member: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if symlink else "pwned")
    return path


@pytest.mark.parametrize("member, symlink", [("../../escaped.txt", False),
                                             ("/tmp/absolute.txt", False),
                                             ("handler/../../../x.py", False),
                                             ("link", True)])
def test_archives_that_unpack_outside_their_directory_are_refused(tmp_path, member, symlink):
    mar = evil_archive(tmp_path / "evil.mar", member, symlink)
    with pytest.raises(ArchiveError, match="outside|symbolic link"):
        check_archive(mar)


def test_serve_refuses_an_evil_archive_and_accepts_a_real_one(trained_version, tmp_path):
    store = tmp_path / "mars"
    store.mkdir()
    evil_archive(store / "evil.mar", "../../escaped.txt")
    home = tmp_path / "ts"
    refused = subprocess.run([sys.executable, "-m", "visionloop.cli", "serve", "start",
                              "--home", str(home), "--model-store", str(store),
                              "--model", "fm=evil.mar"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "outside the model's directory" in refused.stderr
    assert server.read_pid(server.ServerConfig(home=home)) is None  # nothing started
    assert not (tmp_path / "escaped.txt").exists()
    check_archive(package(trained_version, store, "torchscript"))  # ours pass
    with pytest.raises(ArchiveError, match="not a readable model archive"):
        check_archive(trained_version / "manifest.json")

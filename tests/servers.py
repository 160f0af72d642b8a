"""Helpers for tests that run real servers: free loopback ports, an inference request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from visionloop.core.ports import free_loopback_ports
from visionloop.serving import server


def free_ports() -> dict[str, int]:
    """Five distinct free loopback ports: HTTP inference/management/metrics and gRPC."""
    names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port",
             "grpc_management_port")
    return dict(zip(names, free_loopback_ports(len(names)), strict=True))


def predict(cfg: server.ServerConfig, model: str, body: bytes,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{cfg.url('inference')}/predictions/{model}", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except json.JSONDecodeError:
            return exc.code, {"raw": text.decode(errors="replace")}


def worker_pids(cfg: server.ServerConfig, model: str) -> list[int]:
    """The pids of the model's READY workers (a restarted worker has a new one)."""
    described = server.management_json(cfg, f"/models/{model}/all")
    return sorted(int(w["pid"]) for d in described for w in d.get("workers", [])
                  if w.get("status") == "READY")


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus exposition, parsed with the official client: (sample name, sorted
    labels) -> value. The parser names a counter's samples <name>_total."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def kill_worker(cfg: server.ServerConfig, model: str, timeout: float = 60.0) -> tuple[float, float]:
    """kill -9 the model's one worker and wait for TorchServe to start another; returns
    (monotonic time of the kill, time the new worker was READY)."""
    [victim] = worker_pids(cfg, model)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while worker_pids(cfg, model) in ([], [victim]):
        assert time.monotonic() - killed < timeout, f"the worker did not come back in {timeout} s"
        time.sleep(0.1)
    return killed, time.monotonic()


def oversize_status(cfg: server.ServerConfig, model: str, size: int) -> int:
    """A body over max_request_size, sent as curl does (Expect: 100-continue): TorchServe
    refuses it with 413 before the upload. (A client that streams the whole body without
    waiting sees the 413 followed by a connection reset.)"""
    with socket.create_connection(("127.0.0.1", cfg.inference_port), timeout=30) as conn:
        conn.sendall(f"POST /predictions/{model} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


HAPROXY = "/usr/sbin/haproxy"  # Debian's; `make setup` installs it


def start_haproxy(root: Path, backends: list[int], timeout: float = 20.0):
    """Debian's HAProxy on a free loopback port, round-robin over TorchServe inference
    ports, health-checked on /ping (a replica that stops answering is taken out). Returns
    (process, port); stop it with stop_process."""
    (port,) = free_loopback_ports(1)
    servers = "".join(f"    server replica{i} 127.0.0.1:{p} check inter 300ms fall 2 rise 2\n"
                      for i, p in enumerate(backends))
    config = root / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 512\n"
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n"
        "    timeout server 60s\n    retries 2\n    option redispatch\n"
        f"frontend visionloop\n    bind 127.0.0.1:{port}\n    default_backend replicas\n"
        "backend replicas\n    balance roundrobin\n    option httpchk GET /ping\n" + servers)
    log = open(root / "haproxy.log", "ab")  # noqa: SIM115 - the server's whole life
    process = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"HAProxy did not start; see {root / 'haproxy.log'}") from None
            time.sleep(0.1)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""Helpers for tests that run real servers: free loopback ports, an inference request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from serving import server
from visionloop.ports import free_loopback_ports


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

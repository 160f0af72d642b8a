"""Run real TorchServe on loopback: write config.properties, start, wait for ready, stop by pid.

Each server gets its own home directory (working dir, logs, TMPDIR/TEMP for the pid
file and worker sockets), so several instances never collide. Readiness means a worker
READY for every model, not /ping, which answers Healthy while workers crash-loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from visionloop.core.capture_store import DATABASE_ENV
from visionloop.core.errors import MissingDependency, ServiceUnavailable
from visionloop.serving.archive_check import check_archive
from visionloop.serving.inflight import INFLIGHT_ENV, REPLICA_ENV, inflight_dir, replica_name
from visionloop.serving.settings import ServingSettings

log = logging.getLogger(__name__)


class ServerError(ServiceUnavailable, RuntimeError):
    """TorchServe did not start, get ready or stop as expected."""


SOCKET_DIR_MAX = 80  # + "/.ts.sock.PORT" stays under the 107 bytes of a Unix socket path


@dataclass(frozen=True)
class ServerConfig:
    home: Path = Path("runs/torchserve")  # working dir: logs/, tmp/ (pid file, sockets)
    model_store: Path = Path("runs/torchserve/model-store")  # where the .mar files are
    capture_dir: Path = Path("captures")  # the capture store the workers write
    # its index: None = $VISIONLOOP_CAPTURE_DATABASE or SQLite in capture_dir (core.capture_store)
    capture_database: str | None = None
    host: str = "127.0.0.1"  # loopback only; put a proxy in front to expose it
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe also serves gRPC (default 7070/7071): each instance needs its own ports.
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    max_request_size: int = 6_553_500
    # Token auth off by default: both APIs are bound to loopback (see README, Serving).
    token_auth: bool = False
    extra_properties: dict[str, str] = field(default_factory=dict)

    @property
    def tmp(self) -> Path:
        """HOME/tmp: pid file and the workers' Unix sockets (TMP/.ts.sock.PORT). A socket's
        path may not pass 107 bytes, so from a deep HOME it is a short folder in the system
        temp dir, named after HOME (the same HOME always finds it)."""
        path = (self.home / "tmp").resolve()
        if len(str(path)) <= SOCKET_DIR_MAX:
            return self.home / "tmp"
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"visionloop-torchserve-{digest}"

    @property
    def pid_file(self) -> Path:
        return self.tmp / ".model_server.pid"

    def url(self, api: str) -> str:
        port = {"inference": self.inference_port, "management": self.management_port,
                "metrics": self.metrics_port}[api]
        return f"http://{self.host}:{port}"


def write_config(cfg: ServerConfig) -> Path:
    settings = ServingSettings.from_env()
    props = {
        "inference_address": cfg.url("inference"),
        "management_address": cfg.url("management"),
        "metrics_address": cfg.url("metrics"),
        "grpc_inference_address": cfg.host,
        "grpc_management_address": cfg.host,
        "grpc_inference_port": str(cfg.grpc_inference_port),
        "grpc_management_port": str(cfg.grpc_management_port),
        "model_store": str(cfg.model_store.resolve()),
        "disable_token_authorization": str(not cfg.token_auth).lower(),
        "enable_model_api": "true",  # register/unregister versions (loopback only)
        "metrics_mode": "prometheus",
        "model_metrics_auto_detect": "true",  # expose the handler's own metrics (serving.metrics)
        "max_request_size": str(cfg.max_request_size),
        # an archive sets its own workers (serving.archive); this is for any other
        "default_workers_per_model": str(settings.workers),
        "job_queue_size": str(settings.job_queue_size),
        **cfg.extra_properties,
    }
    path = cfg.home / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def _env(cfg: ServerConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TMPDIR=str(cfg.tmp.resolve()), TEMP=str(cfg.tmp.resolve()),
               VISIONLOOP_CAPTURE_DIR=str(cfg.capture_dir.resolve()))
    replica = os.environ.get(REPLICA_ENV) or replica_name(cfg.host, cfg.management_port)
    env[INFLIGHT_ENV] = str(inflight_dir(cfg.model_store, replica).resolve())
    if cfg.capture_database:
        env[DATABASE_ENV] = cfg.capture_database  # the workers' env: not in the process list
    return env


def read_pid(cfg: ServerConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def auth_headers(cfg: ServerConfig, api: str) -> dict[str, str]:
    """With token auth on, the key TorchServe wrote to its working dir for this API
    ("inference" or "management"). Keys expire after 60 minutes (TorchServe's default)."""
    if not cfg.token_auth:
        return {}
    try:
        keys = json.loads((cfg.home / "key_file.json").read_text())
    except (FileNotFoundError, ValueError) as exc:
        raise ServerError(f"token auth is on but {cfg.home / 'key_file.json'} is unreadable: "
                          f"{exc}") from exc
    return {"Authorization": f"Bearer {keys[api]['key']}"}


def management_json(cfg: ServerConfig, path: str, method: str = "GET",
                    timeout: float = 5.0) -> object:
    """A management API call, with the management key when token auth is on."""
    request = urllib.request.Request(f"{cfg.url('management')}{path}", method=method,
                                     headers=auth_headers(cfg, "management"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError:
        raise  # it answered: the caller reads the status
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"TorchServe's management API at {cfg.url('management')} does not "
                          f"answer ({reason})",
                          hint="start it (visionloop serve start) or pass its URL "
                               "(--torchserve-url)") from exc


def management_reachable(cfg: ServerConfig) -> bool:
    """A TorchServe answers on the management port (ours or one in another container)."""
    try:
        management_json(cfg, "/models", timeout=2.0)
    except (urllib.error.URLError, OSError, ValueError, ServerError):
        return False
    return True


def workers_ready(cfg: ServerConfig, model: str, version: str | None = None) -> bool:
    """A READY worker for the model (any version, or the one given)."""
    try:
        described = management_json(cfg, f"/models/{model}/all")
    except (urllib.error.URLError, OSError, ValueError, ServerError):
        return False
    return any(w.get("status") == "READY" for d in described
               if version in (None, d["modelVersion"]) for w in d.get("workers", []))


def wait_ready(cfg: ServerConfig, models: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(cfg) is None:
            raise ServerError(f"TorchServe exited during start-up; see {cfg.home / 'logs'}")
        if all(workers_ready(cfg, m) for m in models):
            return
        time.sleep(0.5)
    raise ServerError(f"no READY worker for {models} after {timeout:.0f}s; "
                      f"see {cfg.home / 'logs' / 'model_log.log'}")


def require_java() -> None:
    """TorchServe's frontend is a Java program: fail now, not after a 30 s wait for a pid."""
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and Path(java_home, "bin", "java").exists()):
        raise MissingDependency(
            "TorchServe needs Java 11 or newer, and no java is on PATH (nor in $JAVA_HOME)",
            hint="install a JRE (Debian: apt-get install openjdk-17-jre-headless, or "
                 "make java) and run it again")


def _command(cfg: ServerConfig, models: dict[str, str], *flags: str) -> list[str]:
    require_java()
    cfg.tmp.mkdir(parents=True, exist_ok=True)
    cfg.capture_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(cfg)
    cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--ncs", *flags,
           "--ts-config", str(config.resolve()), "--model-store", str(cfg.model_store.resolve())]
    for mar in models.values():
        check_archive(cfg.model_store / mar)
    if models:
        cmd += ["--models", *(f"{name}={mar}" for name, mar in models.items())]
    return cmd


def run_foreground(cfg: ServerConfig, models: dict[str, str]) -> None:
    """Replace this process with TorchServe in the foreground (a container's main process)."""
    cmd = _command(cfg, models, "--foreground")
    os.chdir(cfg.home)
    os.execve(cmd[0], cmd, _env(cfg))


def start(cfg: ServerConfig, models: dict[str, str], timeout: float = 120.0) -> int:
    """Start TorchServe with {model name: .mar file in model_store}; returns the Java pid."""
    if read_pid(cfg) is not None:
        raise ServerError(f"TorchServe already runs from {cfg.home} (pid {read_pid(cfg)})")
    cmd = _command(cfg, models)
    log.info("starting TorchServe: %s", " ".join(cmd))
    with open(cfg.home / "torchserve.out", "ab") as out:
        subprocess.run(cmd, cwd=cfg.home, env=_env(cfg), stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    deadline = time.monotonic() + 30
    while read_pid(cfg) is None:
        if time.monotonic() > deadline:
            raise ServerError(f"TorchServe wrote no pid file; see {cfg.home / 'torchserve.out'}")
        time.sleep(0.2)
    wait_ready(cfg, list(models), timeout)
    return read_pid(cfg)


def stop(cfg: ServerConfig, timeout: float = 30.0) -> bool:
    """SIGTERM the Java process and wait for it to exit (SIGKILL after timeout)."""
    pid = read_pid(cfg)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(cfg) is None:
            return True
        time.sleep(0.2)
    log.warning("TorchServe pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
    os.kill(pid, signal.SIGKILL)
    return True


def status(cfg: ServerConfig) -> dict:
    pid = read_pid(cfg)
    result: dict = {"running": pid is not None, "pid": pid, "home": str(cfg.home)}
    if pid is not None:
        try:
            result["models"] = management_json(cfg, "/models")
        except (urllib.error.URLError, OSError, ValueError, ServerError) as exc:
            result["models_error"] = str(exc)
    return result

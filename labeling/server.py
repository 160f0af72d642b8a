"""Run a real Label Studio on loopback: start it from its own venv, wait for /health, stop by pid.

Label Studio pins its own Django stack, so it lives in `.venv-labelstudio` (see the
Makefile) and is only ever run as a separate process. Its data directory holds the SQLite
database, the media, our pid file, log and the generated credentials (mode 0600): the
bootstrap user's API token and Django's SECRET_KEY, fixed once so tokens survive restarts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from visionloop.core.errors import InputError, MissingDependency, ServiceUnavailable
from visionloop.core.fsutil import atomic_write_json

log = logging.getLogger(__name__)

# Plain names Label Studio also reads from the environment (they would override its flags).
_FOREIGN_ENV = ("USERNAME", "PASSWORD", "HOST", "PORT")


class LabelStudioError(ServiceUnavailable, RuntimeError):
    """Label Studio did not start, get healthy or stop as expected."""


VENV_ENV = "VISIONLOOP_LABELSTUDIO_VENV"
LS_VERSION = "1.23.2"


def default_venv() -> Path:
    """Label Studio's venv: $VISIONLOOP_LABELSTUDIO_VENV, else .venv-labelstudio here, else
    the one `make setup` made beside this checkout (commands run from any folder)."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    here = Path(".venv-labelstudio")
    beside = Path(__file__).resolve().parents[1] / ".venv-labelstudio"
    return here if here.exists() or not beside.exists() else beside


@dataclass(frozen=True)
class LabelStudioConfig:
    data_dir: Path = Path("runs/labelstudio")  # SQLite DB, media, pid, log, credentials
    venv: Path = field(default_factory=lambda: default_venv())  # Label Studio's own venv
    host: str = "127.0.0.1"  # loopback only
    port: int = 8090
    files_root: Path = Path("captures")  # served as local files: the capture store
    username: str = "annotator@visionloop.invalid"
    # Webhooks and ML backends on 127.0.0.1 are refused by Label Studio's SSRF guard; we
    # lift it because every component here is on loopback. Keep it on for a public server.
    allow_local_urls: bool = True
    # None: SQLite in data_dir (one machine). postgresql://user:password@host:port/name:
    # PostgreSQL (several annotators, a server that outlives the box); never logged
    database_url: str | None = None
    # A Label Studio run elsewhere (http:// or https://; $LABEL_STUDIO_URL, the SDK's own
    # name): used as is instead of host and port, and never started or stopped by us.
    external_url: str | None = None

    def __post_init__(self) -> None:
        if self.external_url is not None:
            parts = urllib.parse.urlsplit(self.external_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InputError(f"the Label Studio URL must be http(s)://HOST[:PORT][/PATH], "
                                 f"got {self.external_url!r}")

    @property
    def url(self) -> str:
        if self.external_url:
            return self.external_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "labelstudio.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "labelstudio.log"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"


def _new_credentials() -> dict[str, str]:
    return {"password": secrets.token_urlsafe(18),
            "token": secrets.token_hex(20),  # Label Studio wants exactly 40 characters
            # a key starting with "$" is regenerated at every start, killing tokens
            "secret_key": "k" + secrets.token_urlsafe(48),
            # what Label Studio sends our ML backend and webhook receiver (labeling.backend_server)
            "backend_secret": secrets.token_urlsafe(32)}


def credentials(cfg: LabelStudioConfig) -> dict[str, str]:
    """The bootstrap user's password and API token, Django's key and the ML backend's
    shared secret, made once per data dir (a file from before a key existed gains it)."""
    path = cfg.credentials_file
    if path.exists():
        known = json.loads(path.read_text())
        missing = {k: v for k, v in _new_credentials().items() if k not in known}
        if not missing:
            return known
        known.update(missing)
        atomic_write_json(path, known)  # a mkstemp file: mode 0600 like the first one
        return known
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    created = _new_credentials()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(created, f)
    return created


URL_ENV = "LABEL_STUDIO_URL"  # the names label-studio-sdk's own users know
API_KEY_ENV = "LABEL_STUDIO_API_KEY"
TOKEN_ENV = "VISIONLOOP_LABELSTUDIO_TOKEN"  # the older name, still read


def api_token(cfg: LabelStudioConfig) -> str:
    """The token from the environment (a Label Studio run elsewhere, e.g. docker compose),
    else the one generated for the server we run."""
    token = os.environ.get(API_KEY_ENV) or os.environ.get(TOKEN_ENV)
    if token:
        return token
    if cfg.external_url and not cfg.credentials_file.exists():
        raise InputError(f"no API key for the Label Studio at {cfg.url}",
                         hint=f"set {API_KEY_ENV} to the token shown in its Account & "
                              "Settings page")
    return credentials(cfg)["token"]


BACKEND_SECRET_ENV = "VISIONLOOP_BACKEND_SECRET"


def backend_secret(cfg: LabelStudioConfig) -> str:
    """The ML backend's shared secret: from the environment (docker compose), else the one
    generated beside the server we run."""
    return os.environ.get(BACKEND_SECRET_ENV) or credentials(cfg)["backend_secret"]


DATABASE_ENV = "VISIONLOOP_LABELSTUDIO_DATABASE"  # the URL, kept off command lines


def database_env(url: str | None) -> dict[str, str]:
    """Label Studio's database settings: SQLite, or PostgreSQL from a postgresql:// URL."""
    if url is None:
        return {"DJANGO_DB": "sqlite"}
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path[1:]:
        # the URL may hold a password: name the shape, not the value
        raise LabelStudioError("the Label Studio database must be "
                               "postgresql://user:password@host:port/name")
    return {"DJANGO_DB": "default", "POSTGRE_NAME": urllib.parse.unquote(parts.path[1:]),
            "POSTGRE_USER": urllib.parse.unquote(parts.username or ""),
            "POSTGRE_PASSWORD": urllib.parse.unquote(parts.password or ""),
            "POSTGRE_HOST": parts.hostname, "POSTGRE_PORT": str(parts.port or 5432)}


def _env(cfg: LabelStudioConfig) -> dict[str, str]:
    creds = credentials(cfg)
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(database_env(cfg.database_url))
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(cfg.data_dir.resolve()),
        "SECRET_KEY": creds["secret_key"],
        "LABEL_STUDIO_USERNAME": cfg.username,
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_USER_TOKEN": creds["token"],
        # only read when the organisation is first created; the SDK needs legacy tokens
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(cfg.files_root.resolve()),
    })
    if cfg.allow_local_urls:
        env.update(SSRF_PROTECTION_ENABLED="false", ML_BLOCK_LOCAL_IP="false")
    return env


def add_annotator(cfg: LabelStudioConfig, email: str) -> str:
    """Another user in the server's organisation, with a generated password and API token
    (kept in the credentials file beside the others); returns the token. Uses Label
    Studio's own `init` command: its users API sets no usable password. Idempotent."""
    creds = credentials(cfg)
    annotators = creds.get("annotators", {})
    if email not in annotators:
        annotators[email] = {"password": secrets.token_urlsafe(18), "token": secrets.token_hex(20)}
        creds["annotators"] = annotators
        atomic_write_json(cfg.credentials_file, creds)
    binary = (cfg.venv / "bin" / "label-studio").resolve()
    # the user's secrets go through the environment (init reads them there), not argv
    env = {**_env(cfg), "LABEL_STUDIO_USERNAME": email,
           "LABEL_STUDIO_PASSWORD": annotators[email]["password"],
           "LABEL_STUDIO_USER_TOKEN": annotators[email]["token"]}
    subprocess.run([str(binary), "init", "--quiet", "--data-dir", str(cfg.data_dir.resolve())],
                   cwd=cfg.data_dir, env=env, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=300)
    return annotators[email]["token"]


def read_pid(cfg: LabelStudioConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def healthy(cfg: LabelStudioConfig, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{cfg.url}/health", timeout=timeout) as response:
            return json.loads(response.read()).get("status") == "UP"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start(cfg: LabelStudioConfig, timeout: float = 180.0) -> int:
    """Start the server (the first start migrates the database: ~45 s) and wait for /health."""
    if read_pid(cfg) is not None:
        raise LabelStudioError(f"Label Studio already runs from {cfg.data_dir} "
                               f"(pid {read_pid(cfg)})")
    binary = cfg.venv / "bin" / "label-studio"
    if not binary.exists():
        raise MissingDependency(
            f"Label Studio is not installed at {cfg.venv}",
            hint=f"run make setup in the visionloop checkout, or install it in a venv of its "
                 f"own (python3 -m venv V && V/bin/pip install label-studio=={LS_VERSION}) "
                 f"and set {VENV_ENV}=V")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cfg.files_root.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary.resolve()), "start", "--no-browser", "--internal-host", cfg.host,
           "--port", str(cfg.port), "--data-dir", str(cfg.data_dir.resolve())]
    log.info("starting Label Studio: %s", " ".join(cmd))
    with open(cfg.log_file, "ab") as out:
        # its own session: stop() signals the whole group, so no child outlives it
        process = subprocess.Popen(cmd, cwd=cfg.data_dir, env=_env(cfg), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    cfg.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while not healthy(cfg):
        if process.poll() is not None:
            cfg.pid_file.unlink(missing_ok=True)
            raise LabelStudioError(f"Label Studio exited ({process.returncode}) during "
                                   f"start-up; see {cfg.log_file}")
        if time.monotonic() > deadline:
            stop(cfg)
            raise LabelStudioError(f"Label Studio not healthy after {timeout:.0f}s; "
                                   f"see {cfg.log_file}")
        time.sleep(0.5)
    return process.pid


def _gone(pid: int, cfg: LabelStudioConfig) -> bool:
    """Reap it if it is our child; otherwise check that it no longer exists."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return read_pid(cfg) is None


def _wait_gone(pid: int, cfg: LabelStudioConfig, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid, cfg):
            return True
        time.sleep(0.2)
    return False


def stop(cfg: LabelStudioConfig, timeout: float = 20.0) -> bool:
    """SIGTERM the server's process group, wait for it (SIGKILL after timeout)."""
    pid = read_pid(cfg)
    if pid is None:
        cfg.pid_file.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(pid, cfg, timeout):
            break
        log.warning("Label Studio pid %d ignored %s for %.0fs", pid, sig.name, timeout)
    cfg.pid_file.unlink(missing_ok=True)
    return True


def status(cfg: LabelStudioConfig) -> dict:
    pid = read_pid(cfg)
    return {"running": pid is not None, "pid": pid, "url": cfg.url,
            "healthy": pid is not None and healthy(cfg), "data_dir": str(cfg.data_dir)}

"""Debian's PostgreSQL as a test's own server: a fresh data directory, loopback only, a free
port, a generated password, stopped by pid. `make setup` installs the package."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from visionloop.core.ports import free_loopback_ports

USER, DATABASE = "visionloop", "labelstudio"


def binaries() -> Path:
    """The newest installed server's bin/ (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `make setup`")
    return found[-1].parent


@dataclass
class PostgresServer:
    root: Path
    port: int
    password: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"


def _as_owner() -> dict:
    # initdb and postgres refuse to run as root; run them as Debian's postgres user then
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def start(timeout: float = 60.0) -> PostgresServer:
    bin_dir = binaries()
    # not under pytest's tmp: that is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="visionloop-pg-"))
    password = secrets.token_urlsafe(18)
    (root / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "pwfile", "postgres", "postgres")
    subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", USER,
                    f"--pwfile={root / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8"],
                   check=True, capture_output=True, **_as_owner())
    (port,) = free_loopback_ports(1)
    server = PostgresServer(root, port, password, _launch(root, port, timeout))
    subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER,
                    DATABASE], check=True, capture_output=True,
                   env={**os.environ, "PGPASSWORD": password})
    return server


def _launch(root: Path, port: int, timeout: float) -> subprocess.Popen:
    """Run the server on its data directory and wait until it accepts connections."""
    bin_dir = binaries()
    log = open(root / "postgres.log", "ab")  # noqa: SIM115 - the server's whole life
    process = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(root / "data"), "-k", str(root), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **_as_owner())
    deadline = time.monotonic() + timeout
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            _halt(process)
            raise RuntimeError(f"PostgreSQL did not start; see {root / 'postgres.log'}")
        time.sleep(0.2)
    return process


def _halt(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Fast shutdown (SIGINT) by pid, SIGKILL if it hangs."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def halt(server: PostgresServer) -> float:
    """Stop the server (its data kept); returns the monotonic time it was down."""
    _halt(server.process)
    return time.monotonic()


def resume(server: PostgresServer) -> float:
    """Start a halted server again on the same data and port; returns the monotonic time it
    accepted connections."""
    server.process = _launch(server.root, server.port, 60.0)
    return time.monotonic()


def restart(server: PostgresServer, down_s: float) -> tuple[float, float]:
    """Stop the server, keep it down for down_s, start it again on the same data and port.
    Returns (monotonic time it went down, time it accepted connections again)."""
    went_down = halt(server)
    time.sleep(down_s)
    return went_down, resume(server)


def create_database(server: PostgresServer, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    subprocess.run([str(binaries() / "createdb"), "-h", "127.0.0.1", "-p", str(server.port),
                    "-U", USER, name], check=True, capture_output=True,
                   env={**os.environ, "PGPASSWORD": server.password})
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def query(server: PostgresServer, sql: str, database: str = DATABASE) -> str:
    """One value, as psql prints it unaligned."""
    return query_url(server.url.rsplit("/", 1)[0] + f"/{database}", sql)


def query_url(url: str, sql: str) -> str:
    """One value from the database at `url`, as psql prints it unaligned."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    result = subprocess.run([str(binaries() / "psql"), "-h", parts.hostname, "-p",
                             str(parts.port), "-U", parts.username, "-d", parts.path[1:],
                             "-tAc", sql], check=True, capture_output=True, text=True,
                            env={**os.environ, "PGPASSWORD": parts.password or ""})
    return result.stdout.strip()


def stop(server: PostgresServer) -> None:
    """Stop it by pid and remove its files."""
    _halt(server.process)
    shutil.rmtree(server.root, ignore_errors=True)

"""Zero-downtime promotion of a new model version in a running TorchServe.

register new version -> wait for a READY worker -> set it default -> drain the old
version(s) (no pending request, no batch running: serving.inflight) -> unregister them.
Deleting a version that still has requests in flight leaves those requests without any
answer, hence the drain.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from visionloop.core.errors import Incomplete, InputError
from visionloop.core.failpoints import failpoint
from visionloop.serving.archive_check import check_archive
from visionloop.serving.inflight import replica_name, running_batches
from visionloop.serving.server import (
    ServerConfig,
    ServerError,
    management_json,
    management_reachable,
    workers_ready,
)

log = logging.getLogger(__name__)


def management(cfg: ServerConfig, method: str, path: str, timeout: float = 120.0) -> dict:
    try:
        return management_json(cfg, path, method, timeout)
    except urllib.error.HTTPError as exc:
        raise ServerError(f"{method} {path} -> {exc.code}: {exc.read().decode()[:500]}") from exc


def registered_versions(cfg: ServerConfig, model: str) -> list[str]:
    """The versions of the model TorchServe has registered (none: not registered)."""
    try:
        return [d["modelVersion"] for d in management_json(cfg, f"/models/{model}/all")]
    except urllib.error.HTTPError:
        return []


def default_version(cfg: ServerConfig, model: str) -> str:
    """TorchServe 0.12 has no isDefault flag: describing the bare name describes the default."""
    return management_json(cfg, f"/models/{model}")[0]["modelVersion"]


def pending_requests(cfg: ServerConfig, model: str, version: str) -> int:
    described = management_json(cfg, f"/models/{model}/{version}")
    return int(described[0]["jobQueueStatus"]["pendingRequests"])


# After set-default no new request is routed to the old version. TorchServe counts queued
# requests only, and unregistering a version kills a worker mid-batch without answering it
# (seen as 3 requests that never got a reply, behind HAProxy, in tests/test_replicas.py),
# so the drain also waits for the batches the workers mark as running (serving.inflight).
# The quiet window covers a batch between leaving the queue and its worker marking it.
DRAIN_QUIET_S = 0.5


def drain(cfg: ServerConfig, model: str, version: str, timeout: float = 60.0,
          quiet_s: float = DRAIN_QUIET_S) -> int:
    """Wait until the version has had no pending request and no running batch for quiet_s.
    Returns how many checks found a batch running (0: it was idle when drained)."""
    deadline, quiet_since, waited_on_batches = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        now = time.monotonic()
        running = running_batches(cfg.model_store, replica_name(cfg.host, cfg.management_port),
                                  model, version)
        waited_on_batches += running > 0
        if running == 0 and pending_requests(cfg, model, version) == 0:
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= quiet_s:
                return waited_on_batches
        else:
            quiet_since = None
        time.sleep(0.05)
    raise ServerError(f"{model} {version} still had requests in flight after {timeout:.0f}s")


def promote(cfg: ServerConfig, model: str, version: str, mar_file: str,
            timeout: float = 120.0) -> list[str]:
    """Make `version` (packaged as mar_file in the server's model store) the default and the
    only registered version. Returns the versions it unregistered, each drained first.

    Safe to run again after being killed at any step: a version already registered is not
    registered twice, and versions a killed promotion left behind are drained and removed.
    """
    registered = registered_versions(cfg, model)
    if version not in registered:
        check_archive(cfg.model_store / mar_file)
        query = urllib.parse.urlencode({"url": mar_file, "initial_workers": 1,
                                        "synchronous": "true"})
        management(cfg, "POST", f"/models?{query}", timeout)
    deadline = time.monotonic() + timeout
    while not workers_ready(cfg, model, version):
        if time.monotonic() > deadline:
            management(cfg, "DELETE", f"/models/{model}/{version}")
            raise ServerError(f"{model} {version} registered but no worker got READY; removed")
        time.sleep(0.5)
    failpoint("promote.registered")
    if registered and default_version(cfg, model) != version:
        management(cfg, "PUT", f"/models/{model}/{version}/set-default")
        log.info("%s: default is now %s", model, version)
    failpoint("promote.default_set")
    removed = [v for v in registered if v != version]
    for old in removed:
        busy = drain(cfg, model, old)
        management(cfg, "DELETE", f"/models/{model}/{old}")
        log.info("%s: unregistered %s after draining it (%s)", model, old,
                 f"a batch was running at {busy} checks" if busy else "it was idle")
    if not workers_ready(cfg, model):
        raise ServerError(f"{model} has no READY worker after promoting {version}")
    return removed


def replica_configs(management_urls: list[str], model_store: Path,
                    token_auth_home: Path | None = None) -> list[ServerConfig]:
    """One ServerConfig per replica's management URL (http://HOST:PORT). The replicas
    register archives from one model store they all read (a shared volume), so a
    promotion packages once."""
    replicas = []
    for url in management_urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise InputError(f"a TorchServe management URL is http://HOST:PORT, got {url!r}")
        replicas.append(ServerConfig(host=parts.hostname, management_port=parts.port,
                                     model_store=Path(model_store),
                                     home=token_auth_home or ServerConfig.home,
                                     token_auth=token_auth_home is not None))
    if len({r.url("management") for r in replicas}) != len(replicas):
        raise InputError(f"a replica is named twice in {management_urls}")
    return replicas


def serving_versions(replicas: list[ServerConfig], model: str) -> dict[str, list[str] | None]:
    """Management URL -> the model's registered versions (None: the replica did not answer)."""
    return {r.url("management"): (registered_versions(r, model) if management_reachable(r)
                                  else None) for r in replicas}


def describe(serving: dict[str, list[str] | None]) -> str:
    return "; ".join(f"{url} {'unreachable' if versions is None else ', '.join(versions) or '-'}"
                     for url, versions in serving.items())


class RolloutIncomplete(Incomplete, ServerError):
    """A promotion across replicas stopped before every replica served the version."""

    def __init__(self, version: str, reason: str, serving: dict[str, list[str] | None]) -> None:
        self.version, self.serving = version, serving
        super().__init__(f"rollout of {version} stopped: {reason}; replicas serve: "
                         f"{describe(serving)}")


def roll_out(replicas: list[ServerConfig], model: str, version: str, mar_file: str,
             timeout: float = 120.0) -> dict[str, float]:
    """Promote `version` on each replica in turn (each swap is zero-downtime: promote());
    returns seconds per replica. Every replica must answer before the first is touched, so
    a replica that is down changes nothing; one that fails mid-way stops the rollout.
    Either way RolloutIncomplete says which replicas serve what, and the caller does not
    advance the champion record (a later run converges every replica to it)."""
    down = [r.url("management") for r in replicas if not management_reachable(r)]
    if down:
        raise RolloutIncomplete(version, f"{', '.join(down)} did not answer, no replica was "
                                         "changed", serving_versions(replicas, model))
    seconds: dict[str, float] = {}
    for replica in replicas:
        started = time.monotonic()
        try:
            promote(replica, model, version, mar_file, timeout)
        except (ServerError, urllib.error.URLError, OSError) as exc:
            raise RolloutIncomplete(version, f"{replica.url('management')} failed ({exc})",
                                    serving_versions(replicas, model)) from exc
        seconds[replica.url("management")] = round(time.monotonic() - started, 2)
        log.info("%s: %s serves %s (%.1f s)", model, replica.url("management"), version,
                 seconds[replica.url("management")])
    return seconds

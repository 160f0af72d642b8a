"""Zero-downtime promotion of a new model version in a running TorchServe.

register new version -> wait for a READY worker -> set it default -> drain the old
version(s) (no pending requests) -> unregister them. Deleting a version that still has
requests in flight leaves those requests without any answer, hence the drain.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from core.failpoints import failpoint
from serving.archive_check import check_archive
from serving.server import ServerConfig, ServerError, management_json, workers_ready

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


def drain(cfg: ServerConfig, model: str, version: str, timeout: float = 30.0) -> None:
    """Wait until the version has had no pending requests for two consecutive looks."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if pending_requests(cfg, model, version) == 0 else 0
        if quiet >= 2:
            return
        time.sleep(0.25)
    raise ServerError(f"{model} {version} still had pending requests after {timeout:.0f}s")


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
        drain(cfg, model, old)
        management(cfg, "DELETE", f"/models/{model}/{old}")
        log.info("%s: unregistered %s after draining it", model, old)
    if not workers_ready(cfg, model):
        raise ServerError(f"{model} has no READY worker after promoting {version}")
    return removed

"""Connecting to Label Studio, and telling "it is down" apart from "we asked wrongly"."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from visionloop.core.errors import AccessDenied, ServiceUnavailable
from visionloop.labeling.server import LabelStudioConfig, api_token

# the SDK logs every request at INFO through httpx
logging.getLogger("httpx").setLevel(logging.WARNING)


class LabelStudioUnavailable(ServiceUnavailable, RuntimeError):
    """Label Studio is down or failing (5xx): retry later, nothing was lost."""


def connect(cfg: LabelStudioConfig, timeout: float = 30.0) -> LabelStudio:
    """A client whose server answered and accepted the key: one call now, so a command
    fails before it changes anything when Label Studio is down or refuses the key."""
    client = LabelStudio(base_url=cfg.url, api_key=api_token(cfg), timeout=timeout)
    with unavailable_as_error(f"connecting to Label Studio at {cfg.url}"):
        client.users.whoami()
    return client


@contextlib.contextmanager
def unavailable_as_error(action: str) -> Iterator[None]:
    """Re-raise connection failures and 5xx answers as LabelStudioUnavailable, a refused
    key (401, 403) as AccessDenied."""
    try:
        yield
    except httpx.TransportError as exc:
        raise LabelStudioUnavailable(
            f"{action}: Label Studio unreachable ({exc})",
            hint="start it (visionloop labelstudio start) or point LABEL_STUDIO_URL at "
                 "it") from exc
    except ApiError as exc:
        if exc.status_code is not None and exc.status_code >= 500:
            raise LabelStudioUnavailable(f"{action}: Label Studio answered "
                                         f"{exc.status_code}") from exc
        if exc.status_code in (401, 403):
            raise AccessDenied(
                f"{action}: Label Studio refused the API key ({exc.status_code})",
                hint="set LABEL_STUDIO_API_KEY to a valid token (Account & Settings in "
                     "Label Studio)") from exc
        raise


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (not verified: Label Studio does that), or None for a legacy
    token."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


class AuthHeader:
    """The Authorization header for our own HTTP calls to Label Studio (the ML backend's
    image fetches; the SDK does the same for its calls). A legacy token is sent as
    `Token <key>`. A personal access token is a JWT refresh token: it is exchanged at
    /api/token/refresh for a short-lived access token, sent as `Bearer <access>` and
    renewed a minute before it expires."""

    RENEW_BEFORE_S = 60.0

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url, self.token = base_url.rstrip("/"), token
        self.personal = (_jwt_claims(token) or {}).get("token_type") == "refresh"
        self._access: tuple[str, float] | None = None  # (token, expiry unix time)
        self._lock = threading.Lock()

    def __call__(self) -> str:
        if not self.personal:
            return f"Token {self.token}"
        with self._lock:
            if self._access is None or time.time() > self._access[1] - self.RENEW_BEFORE_S:
                self._access = self._refresh()
            return f"Bearer {self._access[0]}"

    def _refresh(self) -> tuple[str, float]:
        request = urllib.request.Request(
            f"{self.base_url}/api/token/refresh/", method="POST",
            data=json.dumps({"refresh": self.token}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            access = json.loads(response.read())["access"]
        return access, float((_jwt_claims(access) or {}).get("exp", time.time() + 300))

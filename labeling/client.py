"""Connecting to Label Studio, and telling "it is down" apart from "we asked wrongly"."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from labeling.server import LabelStudioConfig, api_token

# the SDK logs every request at INFO through httpx
logging.getLogger("httpx").setLevel(logging.WARNING)


class LabelStudioUnavailable(RuntimeError):
    """Label Studio is down or failing (5xx): retry later, nothing was lost."""


def connect(cfg: LabelStudioConfig, timeout: float = 30.0) -> LabelStudio:
    return LabelStudio(base_url=cfg.url, api_key=api_token(cfg), timeout=timeout)


@contextlib.contextmanager
def unavailable_as_error(action: str) -> Iterator[None]:
    """Re-raise connection failures and 5xx answers as LabelStudioUnavailable."""
    try:
        yield
    except httpx.TransportError as exc:
        raise LabelStudioUnavailable(f"{action}: Label Studio unreachable ({exc})") from exc
    except ApiError as exc:
        if exc.status_code is not None and exc.status_code >= 500:
            raise LabelStudioUnavailable(f"{action}: Label Studio answered "
                                         f"{exc.status_code}") from exc
        raise

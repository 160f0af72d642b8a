"""The shared secret Label Studio sends our ML backend and webhook receiver.

Label Studio can send HTTP basic auth to an ML backend and custom headers with a
webhook; either carries the secret (labeling.server generates it with the other
credentials). Light on imports: the project bootstrap uses the names too.
"""

from __future__ import annotations

import base64
import binascii
import hmac

SECRET_HEADER = "X-Visionloop-Secret"
BASIC_AUTH_USER = "visionloop"  # what we configure in Label Studio; any name is accepted


def presented_secret(headers) -> str | None:
    """The secret a request carries, from our header or from basic auth's password."""
    if headers.get(SECRET_HEADER):
        return headers[SECRET_HEADER]
    scheme, _, encoded = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password


def authorised(headers, secret: str) -> bool:
    presented = presented_secret(headers)
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())

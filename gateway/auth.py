"""The API key check HTTP and gRPC share: `authorization: Bearer <key>`, constant-time."""

from __future__ import annotations

import hmac


def bearer_key_matches(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is configured, or the header carries exactly that key.

    hmac.compare_digest takes time independent of where the strings differ, so response
    timing does not leak the key; the key itself is never logged or echoed.
    """
    if api_key is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())

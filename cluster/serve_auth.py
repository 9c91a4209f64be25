"""API keys: ``Authorization: Bearer KEY`` checked against the keys the replica read at start."""

from __future__ import annotations

import secrets

from expertmap.cluster.openai_schemas import APIError


def check_bearer(api_keys: frozenset[str], authorization: str) -> None:
    """Raise ``APIError`` 401 unless ``authorization`` (the header's value) carries one of
    ``api_keys``; no keys configured means no check. Keys are compared in constant time."""
    if not api_keys:
        return
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not any(secrets.compare_digest(key.strip(), k) for k in api_keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

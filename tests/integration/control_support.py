"""Helpers for the runtime-control tests: admin requests with a token, JSON answers."""

from __future__ import annotations

import json
from typing import Any

from tests.support import raw_http, status_of

TOKEN = "s3cret-token-for-the-tests-0123456789"


async def admin_call(
    port: int, method: str, path: str, body: Any = None, *, token: str | None = TOKEN, raw_body: bytes | None = None
) -> tuple[int, Any, bytes]:
    """(status, JSON document or None, the whole response) of one admin request."""
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(data)}"]
    if data:
        head.append("Content-Type: application/json")
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    answer = await raw_http(port, ("\r\n".join(head) + "\r\n\r\n").encode() + data)
    payload = answer.partition(b"\r\n\r\n")[2]
    try:
        doc = json.loads(payload) if payload.strip() else None
    except ValueError:
        doc = None
    return status_of(answer), doc, answer


def metric_value(exposition: bytes, line_start: str) -> float | None:
    for line in exposition.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None

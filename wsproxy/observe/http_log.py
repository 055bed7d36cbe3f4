"""The one log line per plain HTTP request (an `HttpRecord`), kept apart from the WebSocket
session line: `http client=... method=GET path=/x status=200 ...` on `wsproxy.http`, and in the
JSON format an object with `event: "http"` and the same fields as typed values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from wsproxy.observe.session_log import LogLine, emit_line

log = logging.getLogger("wsproxy.http")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def method_label(method: str) -> str:
    """A method for a metric label: the standard ones as sent, anything else "other" (bounded)."""
    return method if method in KNOWN_METHODS else "other"


@dataclass(slots=True)
class HttpRecord:
    """Everything the HTTP log line and the HTTP metrics need about one request."""

    client: str
    listener: str
    method: str
    path: str
    pool: str | None = None
    backend: str | None = None
    status: int = 0  # what the client got; 0: nothing (it left, or the connection broke)
    duration: float = 0.0  # seconds from the request head to the end of the response
    attempts: int = 0  # backends tried
    bytes_from_client: int = 0  # request body bytes
    bytes_from_backend: int = 0  # response body bytes
    reused: bool = False  # the backend connection came from the idle pool
    error: str = ""


def text_line(r: HttpRecord) -> str:
    fields: dict[str, object] = {
        "client": r.client,
        "listener": r.listener,
        "method": r.method,
        "path": r.path,
        "pool": r.pool,
        "backend": r.backend,
        "status": r.status,
        "duration": f"{r.duration:.3f}s",
        "attempts": r.attempts,
        "bytes_in_client": r.bytes_from_client,
        "bytes_in_backend": r.bytes_from_backend,
        "reused": "yes" if r.reused else "no",
    }
    if r.error:
        fields["error"] = repr(r.error)
    return "http " + " ".join(f"{k}={v}" for k, v in fields.items())


def json_fields(r: HttpRecord) -> dict[str, Any]:
    return {
        "event": "http",
        "client": r.client,
        "listener": r.listener,
        "method": r.method,
        "path": r.path,
        "pool": r.pool,
        "backend": r.backend,
        "status": r.status,
        "duration_s": round(r.duration, 6),
        "attempts": r.attempts,
        "bytes_from_client": r.bytes_from_client,
        "bytes_from_backend": r.bytes_from_backend,
        "reused": r.reused,
        "error": r.error or None,
    }


def emit(r: HttpRecord) -> None:
    """Log the request's one line (INFO on wsproxy.http)."""
    emit_line(log, LogLine(r, text_line, json_fields))

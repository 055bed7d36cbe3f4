"""How wsproxy's log lines look: the one line per session, and JSON lines for every record.

A session builds one `SessionRecord` when it ends; `emit` logs it once on `wsproxy.session` at
INFO, as a `session key=value ...` text message that also carries the fields as data. The output
format is chosen once for the whole process (`log.format`): the text formatter prints the
message, `JsonFormatter` prints every record (startup, warnings, errors and session lines alike)
as one JSON object per line, session fields as typed JSON values. No per-frame logging exists.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from wsproxy.protocol.relay import CloseRecord
from wsproxy.protocol.sides import Side

log = logging.getLogger("wsproxy.session")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SESSION_FIELDS = "session"  # the LogRecord attribute carrying a session's fields


@dataclass(slots=True)
class SessionRecord:
    """Everything the session log and the end-of-session metrics need about one session."""

    client: str
    listener: str
    pool: str | None
    backend: str | None
    path: str | None
    subprotocol: str | None
    status: int  # the handshake status the client got (101 when upgraded)
    duration: float  # seconds from accept to the end
    attempts: int  # backends tried
    error: str = ""  # why the handshake failed (or the session broke), "" when it did not
    messages_to_backend: int = 0
    messages_to_client: int = 0
    bytes_from_client: int = 0
    bytes_from_backend: int = 0
    client_close: CloseRecord | None = None
    backend_close: CloseRecord | None = None
    proxy_close: CloseRecord | None = None
    first_closer: str | None = None
    rtt_client: float | None = None  # last round trip of the proxy's ping, seconds
    rtt_backend: float | None = None
    relayed: bool = False  # the relay ran (the stats above are real)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


def shown_target(target: bytes | str, query: str) -> str:
    """A request target as logs and pages show it. Browsers cannot set headers on a WebSocket,
    so tokens travel in the query: `query` (log.query) is `redact` (names kept, values `***`:
    `/chat?token=***&room=***`; a part without `=` may be a bare token and is `***` too),
    `drop` (the query removed) or `keep`. The auth subrequest and the backend get the real one."""
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    path, sep, params = text.partition("?")
    if not sep or query == "keep":
        return text
    if query == "drop":
        return path
    shown = []
    for part in params.split("&"):
        name, eq, value = part.partition("=")
        shown.append(f"{name}=***" if eq and value else part if eq or not part else "***")
    return f"{path}?{'&'.join(shown)}"


def _text_close(rec: CloseRecord | None) -> str:
    if rec is None:
        return "-"
    return f"{rec.code if rec.code is not None else 1005}:{rec.reason!r}"


def _json_close(rec: CloseRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"code": rec.code if rec.code is not None else 1005, "reason": rec.reason}


def text_line(r: SessionRecord) -> str:
    """`session client=... listener=... ...`: the text format's session line."""
    fields: dict[str, object] = {
        "client": r.client,
        "listener": r.listener,
        "pool": r.pool,
        "backend": r.backend,
        "path": r.path,
        "subprotocol": r.subprotocol or "-",
        "status": r.status,
        "duration": f"{r.duration:.3f}s",
        "attempts": r.attempts,
    }
    if r.relayed:
        fields.update(
            bytes_in_client=r.bytes_from_client,
            bytes_in_backend=r.bytes_from_backend,
            msgs_to_backend=r.messages_to_backend,
            msgs_to_client=r.messages_to_client,
            client_close=_text_close(r.client_close),
            backend_close=_text_close(r.backend_close),
            proxy_close=_text_close(r.proxy_close),
            first_closer=r.first_closer or "-",
        )
    for side, rtt in ((Side.CLIENT, r.rtt_client), (Side.BACKEND, r.rtt_backend)):
        if rtt is not None:
            fields[f"rtt_{side}"] = f"{rtt * 1000:.1f}ms"
    if r.error:
        fields["error"] = repr(r.error)
    return "session " + " ".join(f"{k}={v}" for k, v in fields.items())


def json_fields(r: SessionRecord) -> dict[str, Any]:
    """The session's fields as JSON values (null for what does not apply)."""
    return {
        "client": r.client,
        "listener": r.listener,
        "pool": r.pool,
        "backend": r.backend,
        "path": r.path,
        "subprotocol": r.subprotocol,
        "status": r.status,
        "duration_s": round(r.duration, 6),
        "messages_to_backend": r.messages_to_backend,
        "messages_to_client": r.messages_to_client,
        "bytes_from_client": r.bytes_from_client,
        "bytes_from_backend": r.bytes_from_backend,
        "client_close": _json_close(r.client_close),
        "backend_close": _json_close(r.backend_close),
        "proxy_close": _json_close(r.proxy_close),
        "first_closer": r.first_closer,
        "rtt_client_ms": None if r.rtt_client is None else round(r.rtt_client * 1000, 3),
        "rtt_backend_ms": None if r.rtt_backend is None else round(r.rtt_backend * 1000, 3),
        "retries": r.retries,
        "error": r.error or None,
    }


class LogLine(Mapping[str, Any]):
    """A record's log line, formatted when a handler asks for it and at most once: as text
    (`str`, the text format's message) or as JSON fields (`fields`, JsonFormatter's; the line
    is also the mapping of them, as the record's `session` attribute); a process logs in one
    format, so the other is never built (both used to be, for every session)."""

    __slots__ = ("_fields", "_fields_of", "_record", "_text", "_text_of")

    def __init__(self, record: Any, text_of: Callable[[Any], str], fields_of: Callable[[Any], dict[str, Any]]) -> None:
        self._record = record
        self._text_of, self._fields_of = text_of, fields_of
        self._text: str | None = None
        self._fields: dict[str, Any] | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._text_of(self._record)
        return self._text

    def fields(self) -> dict[str, Any]:
        if self._fields is None:
            self._fields = self._fields_of(self._record)
        return self._fields

    def __getitem__(self, key: str) -> Any:
        return self.fields()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields())

    def __len__(self) -> int:
        return len(self.fields())


def emit_line(logger: logging.Logger, line: LogLine) -> None:
    """Log `line` at INFO on `logger`, its text and fields built only by the handler that formats it."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(line, extra={SESSION_FIELDS: line})  # (the message itself: a mapping as an argument is read)


def emit(r: SessionRecord) -> None:
    """Log the session's one line (INFO on wsproxy.session)."""
    emit_line(log, LogLine(r, text_line, json_fields))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, then the message or,
    for a session line, `event: "session"` and its fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        line = getattr(record, SESSION_FIELDS, None)
        if isinstance(line, LogLine):
            out["event"] = "session"
            out.update(line.fields())
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the process's logging: `level` (debug|info|warning|error), `fmt` text|json."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)

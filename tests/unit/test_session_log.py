"""session_log.py: the text line keeps its keys, the JSON line has every field typed, and the
JSON formatter turns every record into one object."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import datetime

import pytest

from wsproxy.observe import session_log
from wsproxy.observe.session_log import (
    JsonFormatter,
    SessionRecord,
    emit,
    json_fields,
    setup_logging,
    shown_target,
    text_line,
)
from wsproxy.protocol.relay import CloseRecord


def relayed(**changes: object) -> SessionRecord:
    base: dict = dict(
        client="127.0.0.1:5000",
        listener="127.0.0.1:8080",
        pool="chat",
        backend="127.0.0.1:9001",
        path="/room/1",
        subprotocol="chat.v2",
        status=101,
        duration=12.3456,
        attempts=2,
        relayed=True,
        messages_to_backend=5,
        messages_to_client=7,
        bytes_from_client=300,
        bytes_from_backend=700,
        client_close=CloseRecord(1000, "bye"),
        backend_close=CloseRecord(None, ""),
        first_closer="client",
        rtt_client=0.0123,
    )
    base.update(changes)
    return SessionRecord(**base)


def test_text_line_keeps_the_keys_of_the_session_line() -> None:
    line = text_line(relayed())
    assert line == (
        "session client=127.0.0.1:5000 listener=127.0.0.1:8080 pool=chat backend=127.0.0.1:9001 path=/room/1 "
        "subprotocol=chat.v2 status=101 duration=12.346s attempts=2 bytes_in_client=300 bytes_in_backend=700 "
        "msgs_to_backend=5 msgs_to_client=7 client_close=1000:'bye' backend_close=1005:'' proxy_close=- "
        "first_closer=client rtt_client=12.3ms"
    )


def test_text_line_of_a_rejection_has_no_relay_fields_and_says_why() -> None:
    r = SessionRecord(
        client="[::1]:5000",
        listener="127.0.0.1:8080",
        pool=None,
        backend=None,
        path="/x",
        subprotocol=None,
        status=400,
        duration=0.001,
        attempts=0,
        error="missing Sec-WebSocket-Key",
    )
    line = text_line(r)
    assert "bytes_in_client" not in line and "rtt_" not in line
    assert line.endswith("status=400 duration=0.001s attempts=0 error='missing Sec-WebSocket-Key'")


def test_json_fields_are_typed_and_complete() -> None:
    assert json_fields(relayed()) == {
        "client": "127.0.0.1:5000",
        "listener": "127.0.0.1:8080",
        "pool": "chat",
        "backend": "127.0.0.1:9001",
        "path": "/room/1",
        "subprotocol": "chat.v2",
        "status": 101,
        "duration_s": 12.3456,
        "messages_to_backend": 5,
        "messages_to_client": 7,
        "bytes_from_client": 300,
        "bytes_from_backend": 700,
        "client_close": {"code": 1000, "reason": "bye"},
        "backend_close": {"code": 1005, "reason": ""},  # a close frame without a code
        "proxy_close": None,
        "first_closer": "client",
        "rtt_client_ms": 12.3,
        "rtt_backend_ms": None,
        "retries": 1,
        "error": None,
    }


def test_emit_writes_one_json_line_through_the_formatter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.session")
    emit(relayed(path='/quote"and\nnewline'))
    [rec] = [r for r in caplog.records if r.name == "wsproxy.session"]
    out = JsonFormatter().format(rec)
    assert "\n" not in out  # one line, whatever the path holds
    doc = json.loads(out)
    assert doc["event"] == "session" and doc["level"] == "info" and doc["logger"] == "wsproxy.session"
    assert doc["path"] == '/quote"and\nnewline'
    assert datetime.fromisoformat(doc["time"]).utcoffset().total_seconds() == 0
    assert rec.getMessage().startswith("session client=")  # the text format's line, from the same record


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_session_line_is_formatted_only_as_the_handler_prints_it(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The text format never builds the JSON fields, the JSON format never the text, and each
    is built once however often it is read."""
    built = {"text": 0, "json": 0}

    def counting(kind: str, build):  # type: ignore[no-untyped-def]
        def wrapped(r: SessionRecord):  # type: ignore[no-untyped-def]
            built[kind] += 1
            return build(r)

        return wrapped

    monkeypatch.setattr(session_log, "text_line", counting("text", text_line))
    monkeypatch.setattr(session_log, "json_fields", counting("json", json_fields))
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("info", fmt, stream)
        emit(relayed())
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(saved[0])
        for h in saved[1]:
            root.addHandler(h)
    [out] = stream.getvalue().strip().splitlines()
    if fmt == "json":
        assert json.loads(out)["client"] == "127.0.0.1:5000"
        assert built == {"text": 0, "json": 1}
    else:
        assert "session client=127.0.0.1:5000" in out
        assert built == {"text": 1, "json": 0}


def test_emit_is_silent_below_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsproxy.session")
    emit(relayed())
    assert not [r for r in caplog.records if r.name == "wsproxy.session"]


def test_json_formatter_handles_plain_records_and_exceptions() -> None:
    logger = logging.getLogger("wsproxy.test")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logger.makeRecord("wsproxy.test", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["message"] == "failed x" and doc["level"] == "error" and "event" not in doc
    assert "ValueError: boom" in doc["exception"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_picks_the_format(fmt: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("warning", fmt, stream)
        logging.getLogger("wsproxy.x").info("hidden")
        logging.getLogger("wsproxy.x").warning("shown %d", 1)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(saved[0])
        for h in saved[1]:
            root.addHandler(h)
    out = stream.getvalue().strip().splitlines()
    assert len(out) == 1
    if fmt == "json":
        assert json.loads(out[0])["message"] == "shown 1"
    else:
        assert out[0].endswith("WARNING wsproxy.x: shown 1")
    assert session_log.TEXT_FORMAT.endswith("%(message)s")


@pytest.mark.parametrize(
    ("target", "mode", "shown"),
    [
        ("/chat?token=SECRET&room=7", "redact", "/chat?token=***&room=***"),
        ("/chat?SECRET", "redact", "/chat?***"),  # a bare part may be a token
        ("/chat?a=&&b=1", "redact", "/chat?a=&&b=***"),
        ("/chat?", "redact", "/chat?"),
        ("/chat", "redact", "/chat"),
        ("/chat?token=SECRET", "drop", "/chat"),
        ("/chat?token=SECRET", "keep", "/chat?token=SECRET"),
        (b"/x?k=v", "redact", "/x?k=***"),
    ],
)
def test_shown_target_redacts_drops_or_keeps_query_values(target: str | bytes, mode: str, shown: str) -> None:
    assert shown_target(target, mode) == shown

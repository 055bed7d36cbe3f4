"""Fuzz targets: hypothesis properties over everything that parses what a client sends.

Each target is a `@given` function without settings; `tests/unit/test_fuzz.py` runs every target
briefly with each test run, and `python -m tests.fuzz --minutes N` runs them for as long as asked
(see docs/fuzzing.md). The properties are the ones an edge must keep under any input: never an
unhandled exception, always the right HTTP status or close code, and nothing invalid passed on.

- `request_bytes`: raw request bytes (valid Upgrades mutated: headers dropped, doubled, re-cased,
  given odd values; bytes flipped) through h11 as the session reads them, the handshake
  validator, the listener/route rules, hash-key extraction, the upstream request and the auth
  subrequest that would be built from them.
- `config_yaml`: config-shaped YAML, edge keys included, through the config loader.
- `origins`: any text as an Origin header and as an `allowed_origins` entry.
- `relay_frames`: random frame sequences (fragments interleaved with control frames, bad opcodes,
  RSV bits, wrong masking, bad lengths, bad close payloads, invalid UTF-8, a garbage tail) from
  one peer, through both relays, checked against an independent model of RFC 6455.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import yaml
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from tests.support import backend_reads
from wsproxy.config import AuthConfig, Config, ConfigError, HashKey, parse_config
from wsproxy.config.origins import parse_origin, parse_origin_pattern
from wsproxy.policy import routing
from wsproxy.policy.admission import apply_rules, route_rules
from wsproxy.policy.origin import origin_allowed
from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.frames import (
    ERROR,
    HEADER,
    NEED_DATA,
    PAYLOAD,
    FrameParser,
    apply_mask,
    build_close,
    valid_wire_close_code,
)
from wsproxy.protocol.handshake import (
    ClientUpgrade,
    Rejection,
    build_upstream_request,
    head_size,
    validate_client_request,
)
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay
from wsproxy.runtime.auth import build_check

TARGETS: dict[str, Callable[[], None]] = {}


def target(fn: Callable[[], None]) -> Callable[[], None]:
    TARGETS[fn.__name__] = fn
    return fn


# =============================================================================================
# request bytes -> h11 -> handshake validator -> rules -> upstream request

MAX_HEADER_BYTES = 4096
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
VALID_HEADERS: list[tuple[bytes, bytes]] = [
    (b"Host", b"chat.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Origin", b"https://app.example.com"),
    (b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2"),
    (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
    (b"Cookie", b"session=abc; user=7"),
    (b"Authorization", b"Bearer t"),
    (b"X-User-Id", b"forged"),
]
RULES_CONFIG = parse_config(
    """\
listeners:
  - address: 127.0.0.1:0
    allowed_origins: [https://app.example.com, "*.example.org", "null"]
    auth: {url: http://127.0.0.1:9100/check, copy_headers: [X-User-Id], pass_headers: [Authorization, Cookie]}
    routes:
      - {pool: p, match: {path_prefix: /chat}, allowed_subprotocols: [chat.v2, chat.v3]}
      - {pool: p, match: {host: "*.example.com"}, auth: off}
      - {pool: p}
pools:
  p: {backends: [127.0.0.1:9001]}
""",
    source="fuzz-rules.yaml",
)
AUTH = RULES_CONFIG.listeners[0].auth
HASH_KEYS = [
    HashKey("header", "x-user"),
    HashKey("cookie", "session"),
    HashKey("query", "room"),
    HashKey("path"),
    HashKey("client_ip"),
]
_NAMES = st.sampled_from([n for n, _ in VALID_HEADERS] + [b"Content-Length", b"Transfer-Encoding", b"X-Forwarded-For"])
_VALUES = st.one_of(
    st.sampled_from([v for _, v in VALID_HEADERS] + [b"", b" ", b"0", b"websocket, upgrade", b"13, 8", b"null"]),
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8")),
)


@st.composite
def request_bytes_strategy(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"get", b"CONNECT", b"G\x00T"]))
    path = draw(st.sampled_from([b"/", b"/chat/room?room=1&x=%FF", b"/a%00b", b"*", b"http://h/x", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]))
    headers = list(VALID_HEADERS)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["drop", "dup", "case", "value", "add"]))
        i = draw(st.integers(0, len(headers) - 1)) if headers else 0
        if op == "drop" and headers:
            headers.pop(i)
        elif op == "dup" and headers:
            headers.insert(i, headers[i])
        elif op == "case" and headers:
            headers[i] = (headers[i][0].swapcase(), headers[i][1])
        elif op == "value" and headers:
            headers[i] = (headers[i][0], draw(_VALUES))
        else:
            headers.insert(i, (draw(_NAMES), draw(_VALUES)))
    head = method + b" " + path + b" " + version + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    data = bytearray(head + draw(st.sampled_from([b"", b"", b"\x81\x85garbage", b"0\r\n\r\n"])))
    for _ in range(draw(st.integers(0, 2))):  # a few byte-level flips
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def read_request(data: bytes, cuts: list[int]) -> h11.Request | int | None:
    """What HandshakePhase._read_request makes of these bytes: a request, an error status, or None."""
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)] + [b""]
    request = None
    for chunk in chunks:
        h.receive_data(chunk)
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                return exc.error_status_hint
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                if head_size(event) > MAX_HEADER_BYTES:
                    return 431
                request = event
            elif isinstance(event, h11.Data):
                return 400
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return request
    return request


def _serializes(request: h11.Request) -> bytes:
    """The proxy must never build a request h11 refuses to send."""
    return h11.Connection(h11.CLIENT).send(request)


@target
@given(
    data=request_bytes_strategy(),
    cuts=st.lists(st.integers(0, 2000), max_size=4).map(sorted),
    ip=st.sampled_from(["127.0.0.1", "::1", "10.0.0.7"]),
)
def request_bytes(data: bytes, cuts: list[int], ip: str) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    got = read_request(data, cuts)
    if isinstance(got, int):
        assert 400 <= got < 500 or got == 501, got  # 501: a Transfer-Encoding h11 does not implement
        return
    if got is None:
        return
    checked = validate_client_request(got)
    if isinstance(checked, Rejection):
        assert checked.status in (400, 426), checked
        response = h11.Connection(h11.CLIENT)
        response.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]))
        response.send(h11.EndOfMessage())
        response.receive_data(checked.to_bytes())
        assert response.next_event().status_code == checked.status
        return
    assert isinstance(checked, ClientUpgrade)
    for spec in HASH_KEYS:
        key = routing.extract_hash_key(spec, checked, ip)
        assert key is None or (isinstance(key, bytes) and key)
    listener = RULES_CONFIG.listeners[0]
    rules = route_rules(listener, checked.host, checked.path)
    assert rules is not None  # the listener has a default route
    ruled = apply_rules(listener, rules, checked)
    if isinstance(ruled, Rejection):
        assert ruled.status in (400, 403)
        return
    if rules.allowed_subprotocols is not None:
        assert ruled.subprotocols and set(ruled.subprotocols) <= set(rules.allowed_subprotocols)
    if rules.auth is not None:
        assert ruled.header(b"x-user-id") is None  # only the auth service may set it
        _serializes(build_check(rules.auth, ruled, client_ip=ip, scheme="https"))
    upstream = build_upstream_request(
        ruled,
        key=KEY,
        origin=Origin.direct(ip),
        scheme="http",
        extension_offer="permessage-deflate",
        extra_headers=[(b"X-User-Id", b"42")],
    )
    assert upstream.startswith(b"GET ")
    backend_reads(upstream)  # a head the backend's parser reads whole


# =============================================================================================
# config loader

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "off",
            "20/s",
            "1MiB/s",
            "600/m",
            "4MiB",
            "10s",
            "0",
            "http://127.0.0.1:9100/check",
            "https://a/",
            "*.example.com",
            "https://app.example.com",
            "chat.v2",
            "X-User-Id",
            "Host",
            "a b",
        ]
    ),
)
_TREE = st.recursive(
    _SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
    max_leaves=10,
)


def _maybe(fields: dict) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, _TREE) for k, v in fields.items()})


_RATE = st.one_of(_SCALARS, _maybe({"rate": _SCALARS, "burst": _SCALARS, "extra": _SCALARS}))
_AUTH = _maybe(
    {
        "url": _SCALARS,
        "timeout": _SCALARS,
        "pass_headers": st.lists(_SCALARS, max_size=3),
        "copy_headers": st.lists(_SCALARS, max_size=3),
        "cache": _SCALARS,
        "cache_entries": _SCALARS,
    }
)
_EDGE_LISTENER = _maybe(
    {
        "allowed_origins": st.lists(_SCALARS, max_size=3),
        "allowed_subprotocols": st.lists(_SCALARS, max_size=3),
        "auth": _AUTH,
        "routes": st.lists(
            _maybe({"pool": st.just("p"), "allowed_subprotocols": st.lists(_SCALARS, max_size=2), "auth": _AUTH}),
            max_size=2,
        ),
    }
)
_RATE_LIMITS = _maybe(
    {
        "handshakes_per_ip": _RATE,
        "max_sessions_per_ip": _SCALARS,
        "messages": _RATE,
        "bytes": _RATE,
        "close_after": _SCALARS,
        "max_tracked_ips": _SCALARS,
    }
)


@target
@given(
    listener=_EDGE_LISTENER,
    rate_limits=st.one_of(_RATE_LIMITS, _TREE),
    limits=_maybe({"max_sessions": _SCALARS, "retry_after": _SCALARS}),
    pool_max=_SCALARS,
    backend_max=_SCALARS,
)
def config_yaml(listener: dict, rate_limits: object, limits: dict, pool_max: object, backend_max: object) -> None:  # type: ignore[type-arg]
    lst = {"address": "127.0.0.1:0", **listener}
    if "routes" not in lst:
        lst["pool"] = "p"
    tree = {
        "listeners": [lst],
        "pools": {
            "p": {"max_sessions": pool_max, "backends": [{"address": "127.0.0.1:9001", "max_sessions": backend_max}]}
        },
        "rate_limits": rate_limits,
        "limits": limits,
    }
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        config = parse_config(text, source="fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(m, str) and m for _, m in exc.problems)
        return
    assert isinstance(config, Config)
    rl = config.rate_limits
    for spec in (rl.handshakes_per_ip, rl.messages, rl.bytes):
        assert spec is None or (spec.rate > 0 and spec.burst >= 1)
    auth = config.listeners[0].auth
    assert auth is None or (isinstance(auth, AuthConfig) and auth.timeout > 0)


# =============================================================================================
# origins


@target
@given(value=st.one_of(st.binary(max_size=60), st.text(max_size=60)), pattern=st.text(max_size=40))
def origins(value: bytes | str, pattern: str) -> None:
    parsed = parse_origin(value)
    try:
        compiled = parse_origin_pattern(pattern)
    except ValueError:
        compiled = parse_origin_pattern("*.example.com")
    allowed = origin_allowed((compiled,), [value if isinstance(value, bytes) else value.encode("utf-8")])
    assert not allowed or parsed is not None or not isinstance(value, bytes)
    assert parse_origin_pattern(str(compiled)) == compiled  # what it prints is what it means


# =============================================================================================
# the frame path of both relays


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three RSV bits, 0..7
    mask: bool | None = None  # None: what the direction demands
    length: str = "minimal"  # minimal | wide16 | wide64 | msb64

    def encode(self, masked_direction: bool, rng: random.Random) -> bytes:
        mask = masked_direction if self.mask is None else self.mask
        n = len(self.payload)
        b0 = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        mbit = 0x80 if mask else 0
        if self.length == "msb64":
            head = struct.pack("!BBQ", b0, mbit | 127, (1 << 63) | n)
        elif self.length == "wide64" or n >= 0x10000:
            head = struct.pack("!BBQ", b0, mbit | 127, n)
        elif self.length == "wide16" or n >= 126:
            head = struct.pack("!BBH", b0, mbit | 126, n)
        else:
            head = bytes((b0, mbit | n))
        if mask:
            key = rng.randbytes(4)
            return head + key + apply_mask(self.payload, key)
        return head + self.payload


@dataclass
class Expect:
    """What the model says the relay must do with one peer's frames."""

    forwarded: list[Frame] = field(default_factory=list)  # frames that must pass on
    stop: str = "none"  # none | close | error
    code: int | None = None  # the sender's close code (close) or the code it earns (error)
    alt_codes: set[int] = field(default_factory=set)  # also acceptable (inspect and bad UTF-8)
    mid_message: bool = False  # the stream stopped inside a fragmented message


def _utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def model(frames: list[Frame], *, masked_direction: bool, limit: int | None, inspect: bool) -> Expect:
    """An independent reading of RFC 6455 section 5 for one direction (no extensions)."""
    out = Expect()
    in_message = False
    message_bytes = 0
    text: bytes | None = None  # the current text message so far (for the UTF-8 check)
    for f in frames:
        mask = masked_direction if f.mask is None else f.mask
        control = f.opcode >= 8
        bad = (
            f.opcode not in (0, 1, 2, 8, 9, 10)
            or (control and (not f.fin or len(f.payload) > 125))
            or (f.opcode in (1, 2) and in_message)
            or (f.opcode == 0 and not in_message)
            or f.rsv != 0
            or mask != masked_direction
            or f.length == "msb64"
            or (f.length == "wide16" and len(f.payload) < 126)
            or (f.length == "wide64" and len(f.payload) < 0x10000)
        )
        if bad:
            out.stop, out.code = "error", 1002
            break
        if not control:
            total = len(f.payload) + (message_bytes if f.opcode == 0 else 0)
            if limit is not None and total > limit:
                out.stop, out.code = "error", 1009
                break
            message_bytes = total
            if f.opcode == 1:
                text = f.payload
            elif f.opcode == 0 and text is not None:
                text += f.payload
            if inspect and text is not None and not _utf8_ok(text):
                # wsproto checks text as it arrives; an incomplete last character only at the end
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if exc.reason != "unexpected end of data" or f.fin:
                        out.alt_codes.add(1007)
            in_message = not f.fin
            if f.fin:
                text = None
        if f.opcode == 8:
            p = f.payload
            if len(p) == 1 or (len(p) >= 2 and not valid_wire_close_code(struct.unpack("!H", p[:2])[0])):
                out.stop, out.code = "error", 1002
                break
            if not _utf8_ok(p[2:]):
                out.stop, out.code = "error", 1007
                break
            out.forwarded.append(f)
            out.stop = "close"
            out.code = struct.unpack("!H", p[:2])[0] if p else None
            break
        out.forwarded.append(f)
    out.mid_message = in_message
    return out


_PAYLOAD = st.one_of(st.binary(max_size=40), st.binary(min_size=120, max_size=300))
_TEXT = st.one_of(
    st.text(max_size=30).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"\xff", b"\xc3", b"ok\xed\xa0\x80", b"\xe2\x82", "é".encode()]),
)


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[Frame]:
    """Mostly well-formed traffic (messages in fragments with controls between them), then a few
    mutations that each break one rule."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong", "close"]))
        if kind in ("text", "binary"):
            parts = draw(st.lists(_TEXT if kind == "text" else _PAYLOAD, min_size=1, max_size=3))
            for i, part in enumerate(parts):
                frames.append(Frame(0 if i else (1 if kind == "text" else 2), part, fin=i == len(parts) - 1))
                if draw(st.booleans()) and i < len(parts) - 1:
                    frames.append(Frame(draw(st.sampled_from([9, 10])), draw(st.binary(max_size=20))))
        elif kind == "close":
            code = draw(st.sampled_from([1000, 1001, 4000, 1005, 999, 2999]))
            reason = draw(st.sampled_from([b"", b"bye", b"\xff"]))
            payload = draw(st.sampled_from([b"", b"\x03", struct.pack("!H", code) + reason]))
            frames.append(Frame(8, payload))
        else:
            frames.append(Frame(9 if kind == "ping" else 10, draw(st.binary(max_size=20))))
    for _ in range(draw(st.integers(0, 2))):
        if not frames:
            break
        f = frames[draw(st.integers(0, len(frames) - 1))]
        what = draw(st.sampled_from(["rsv", "opcode", "mask", "fin", "wide16", "wide64", "msb64", "big_control"]))
        if what == "rsv":
            f.rsv = draw(st.integers(1, 7))
        elif what == "opcode":
            f.opcode = draw(st.sampled_from([0, 1, 2, 3, 7, 11, 15]))
        elif what == "mask":
            f.mask = draw(st.booleans())
        elif what == "fin":
            f.fin = not f.fin
        elif what == "big_control" and f.opcode >= 8:
            f.payload = bytes(126)
        elif what in ("wide16", "wide64", "msb64"):
            f.length = what
    return frames


@target
@given(
    frames=frame_sequences(),
    inspect=st.booleans(),
    from_client=st.booleans(),
    limit=st.sampled_from([None, 100, 1000]),
    tail=st.one_of(st.just(b""), st.binary(min_size=1, max_size=30)),
    eof=st.booleans(),
    seed=st.integers(0, 2**16),
)
def relay_frames(
    frames: list[Frame], inspect: bool, from_client: bool, limit: int | None, tail: bytes, eof: bool, seed: int
) -> None:
    rng = random.Random(seed)
    relay = InspectRelay(max_message_bytes=limit) if inspect else PassthroughRelay(max_message_bytes=limit)
    expect = model(frames, masked_direction=from_client, limit=limit, inspect=inspect)
    wire = b"".join(f.encode(from_client, rng) for f in frames) + tail
    feed = relay.feed_client if from_client else relay.feed_backend
    pos = 0
    while pos < len(wire):
        step = rng.choice((1, 2, 5, 13, 100, 4096))
        feed(wire[pos : pos + step])
        pos += step
    if eof:
        feed(b"")
    to_other = relay.take_for_backend() if from_client else relay.take_for_client()
    if relay.stats.proxy_close is not None and relay.stats.proxy_close.code in (1002, 1007, 1009):
        # The other peer answers the close it got: only then does the sender get its own (the
        # other's replies in flight reach it first).
        if from_client:
            relay.feed_backend(build_close(1001, "", mask=False))
        else:
            relay.feed_client(build_close(1011, "", mask=True))
    to_sender = relay.take_for_client() if from_client else relay.take_for_backend()
    # Whatever happened, both outputs are valid frame streams for their receivers.
    sender_frames = parse_frames(to_sender, masked=not from_client)
    other_frames = parse_frames(to_other, masked=from_client)
    stats = relay.stats
    proxy_code = stats.proxy_close.code if stats.proxy_close else None
    other_closes = [code for op, code, _ in other_frames if op == 8]
    if expect.alt_codes and proxy_code in expect.alt_codes:
        return  # inspect refused invalid UTF-8 text before the model's stop point: allowed
    if tail and expect.stop == "none":
        # After well-formed traffic, garbage: refused with a code, or (if it looks like the start
        # of a frame) still waiting for the rest.
        assert proxy_code in (None, 1002, 1007, 1009, 1011 if eof and not from_client else None)
        return
    if expect.stop == "error":
        assert proxy_code == expect.code, (proxy_code, expect)
        assert [(op, code) for op, code, _ in sender_frames] == [(8, expect.code)]
        # The other peer: 1001 when the client is at fault or a message was too big, else 1011.
        assert other_closes == [1001 if from_client or expect.code == 1009 else 1011]
    elif expect.stop == "close":
        assert proxy_code is None
        sent = stats.client_close if from_client else stats.backend_close
        assert sent is not None and sent.code == expect.code
        assert other_closes[-1:] == [expect.code if expect.code is not None else 1005]
        assert sender_frames == []  # the other peer has not answered yet
    else:
        # A backend that vanished is the proxy's 1011 (an alert on proxy closes sees it).
        assert proxy_code == (1011 if eof and not from_client else None), stats.proxy_close
        assert sender_frames == []
        if eof:
            # The sender vanished: the other peer hears 1001/1011, unless a frame was cut in two.
            assert other_closes in ([1001 if from_client else 1011], [])
        else:
            assert other_closes == []
    if not inspect and not tail:
        # Passthrough forwards frames verbatim: the other peer gets exactly the frames the model
        # let through (then the proxy's close, if any).
        expected_data = [(f.opcode, f.payload) for f in expect.forwarded]
        got = [(op, payload) for op, _, payload in other_frames]
        assert got[: len(expected_data)] == expected_data
    elif inspect and not tail:
        # wsproto re-frames: compare the data carried. Whole messages must all have passed; of an
        # unfinished one, a prefix may have (the end of a text fragment waits for its character
        # to complete; over the size limit, part of the offending frame passed as it streamed).
        data_frames = [f for f in expect.forwarded if f.opcode < 8]
        last_fin = max((i for i, f in enumerate(data_frames) if f.fin), default=-1)
        whole = b"".join(f.payload for f in data_frames[: last_fin + 1])
        everything = b"".join(f.payload for f in data_frames)
        got_data = b"".join(p for op, _, p in other_frames if op < 8)
        assert got_data.startswith(whole)
        assert expect.code == 1009 or everything.startswith(got_data)


def parse_frames(data: bytes, *, masked: bool) -> list[tuple[int, int | None, bytes]]:
    """(opcode, close code or None, unmasked payload) of every whole frame; a protocol error or a
    bad close frame in what the proxy sends fails the property."""
    parser = FrameParser(masked=masked)
    frames: list[tuple[int, int | None, bytes]] = []
    pos, payload, opcode, mask = 0, b"", 0, None
    while pos < len(data):
        kind, end = parser.next_event(data, pos)
        assert kind != ERROR, f"the proxy sent an invalid frame: {parser.error_reason}"
        if kind == NEED_DATA:
            break
        if kind == HEADER:
            opcode, mask, payload = parser.opcode, parser.mask, b""
            if parser.length == 0:
                frames.append(_finish(opcode, payload))
        elif kind == PAYLOAD:
            payload += data[pos:end]
            if parser.remaining == 0:
                frames.append(_finish(opcode, apply_mask(payload, mask) if mask else payload))
        pos = end
    return frames  # a last frame may be cut short: the sender's stream ended inside it


def _finish(opcode: int, payload: bytes) -> tuple[int, int | None, bytes]:
    if opcode != 8:
        return opcode, None, payload
    assert len(payload) != 1
    code = struct.unpack("!H", payload[:2])[0] if payload else 1005
    assert code == 1005 or valid_wire_close_code(code), code
    assert _utf8_ok(payload[2:])
    return opcode, code, payload


# A wsproto peer must accept everything the inspect relay sends (checked on its own, so a bug in
# parse_frames cannot hide one in the relay).
@target
@given(frames=frame_sequences(), seed=st.integers(0, 2**16))
def inspect_output_is_valid_for_wsproto(frames: list[Frame], seed: int) -> None:
    rng = random.Random(seed)
    relay = InspectRelay()
    relay.feed_client(b"".join(f.encode(True, rng) for f in frames))
    backend = Connection(ConnectionType.SERVER)
    backend.receive_data(relay.take_for_backend())
    for event in backend.events():
        assert not (isinstance(event, CloseConnection) and event.code in (1002, 1007)), event
        assert isinstance(event, TextMessage | BytesMessage | Ping | Pong | CloseConnection)

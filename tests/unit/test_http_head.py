"""http_head.py against h11 as the oracle: a 101 it reads, h11 reads alike; a head it writes, h11
writes byte for byte; what it does not take (another status, an unusual 101) is left to h11."""

from __future__ import annotations

import h11
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from wsproxy.protocol.http_head import Switching, encode_request, encode_response, head_end, may_be_101, parse_101

TOKEN = st.text(alphabet="-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1)
# Bytes h11 allows in a value and some it does not (CR, LF, NUL, other controls), to see both sides.
_PLAIN_VALUE = st.text(alphabet=" \tabcXYZ019=;,/\x7f\x80\xff", max_size=20).map(lambda s: s.encode("latin-1"))
VALUE = st.one_of(_PLAIN_VALUE, _PLAIN_VALUE, _PLAIN_VALUE, st.binary(max_size=20))
NAME = st.one_of(
    *[TOKEN.map(str.encode)] * 6, st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"bad name", b""])
)
SEP = st.sampled_from([b": ", b":", b":\t", b" : ", b":  "])
TRAIL = st.sampled_from([b"", b" ", b"\t "])
EOL = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r\n "])
STATUS = st.sampled_from(
    [
        *(b"HTTP/1.1 101", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101 ", b"HTTP/1.0 101 x"),
        *(b"HTTP/1.1 200 OK", b"HTTP/1.1 1010 x", b"HTTP/1.1 101\tx", b"HTTP/1.1 101 a\x00b", b"HTTP/1.1 100 Continue"),
    ]
)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    lines = [draw(STATUS) + draw(EOL)]
    for _ in range(draw(st.integers(0, 5))):
        lines.append(draw(NAME) + draw(SEP) + draw(VALUE) + draw(TRAIL) + draw(EOL))
    return b"".join(lines) + b"\r\n"


@st.composite
def plain_heads(draw: st.DrawFn) -> bytes:
    """101 heads of the plain shape, with the whitespace and characters h11 allows."""
    status = draw(st.sampled_from([b"HTTP/1.1 101", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101 \t\x80"]))
    lines = [status + b"\r\n"]
    for _ in range(draw(st.integers(0, 5))):
        sep = draw(st.sampled_from([b": ", b":", b":\t", b":  "]))
        lines.append(draw(TOKEN).encode() + sep + draw(_PLAIN_VALUE) + draw(TRAIL) + b"\r\n")
    return b"".join(lines) + b"\r\n"


def _h11_answer(data: bytes) -> h11.InformationalResponse | h11.Response | None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"b"), (b"Upgrade", b"websocket")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, h11.InformationalResponse | h11.Response) or event is h11.NEED_DATA
    return event if event is not h11.NEED_DATA else None


@settings(max_examples=500, deadline=None)
@given(plain_heads() | heads(), st.binary(max_size=8))
@example(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"\x81\x00")
def test_a_101_read_directly_is_what_h11_reads(head: bytes, trailing: bytes) -> None:
    data = head + trailing
    end = head_end(data)
    assume(end >= 0)  # a generated line that starts with a space can make the blank line a folded one
    ours = parse_101(data[:end])
    if ours is None:
        return  # h11 reads it (the fallback): nothing to compare
    theirs = _h11_answer(data)
    assert isinstance(theirs, h11.InformationalResponse)
    assert theirs.status_code == ours.status_code == 101
    assert theirs.reason == ours.reason
    assert theirs.http_version == ours.http_version
    assert [(bytes(k), bytes(v)) for k, v in theirs.headers.raw_items()] == list(ours.raw_items())
    assert data[end:] == trailing  # the frames the backend sent after its 101


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # another status: h11's
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.0 101 Switching Protocols\r\n\r\n",  # legal, not plain
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n x\r\n\r\n",  # a folded line
        b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n",  # framing h11 checks
        b"HTTP/1.1 101 Switching Protocols\r\nbad name: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\n\r\n",  # a bare LF
    ],
)
def test_anything_but_a_plain_101_is_left_to_h11(head: bytes) -> None:
    assert head_end(head) == len(head)
    assert parse_101(head) is None


def test_a_plain_101_keeps_names_as_sent_and_strips_values() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade:  websocket \r\nSet-Cookie: a=1; b\r\n\r\n"
    assert parse_101(head) == Switching(
        headers=((b"Upgrade", b"websocket"), (b"Set-Cookie", b"a=1; b")), reason=b"Switching Protocols"
    )


@given(plain_heads(), st.integers(1, 7))
def test_a_head_read_in_pieces_ends_where_a_whole_one_does(head: bytes, piece: int) -> None:
    got, end = b"", -1
    for at in range(0, len(head), piece):
        searched = len(got) - 2
        got += head[at : at + piece]
        end = head_end(got, searched)
        if end >= 0:
            break
    assert end == head_end(head) == len(head)


def test_an_incomplete_head_is_waited_for_only_while_it_can_be_a_101() -> None:
    assert head_end(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n") == -1
    assert may_be_101(b"HTT") and may_be_101(b"HTTP/1.1 101 Swi")
    assert not may_be_101(b"HTTP/1.1 404") and not may_be_101(b"\x16\x03\x01")


HEADER_LISTS = st.lists(
    st.tuples(
        TOKEN.map(str.encode) | st.sampled_from([b"Host", b"HOST"]),
        st.text(alphabet="abcXYZ019=;,/ ", max_size=15).map(lambda s: s.strip().encode()),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(HEADER_LISTS, st.sampled_from([b"/", b"/chat?x=1", b"/a%20b"]))
def test_a_request_head_is_written_as_h11_writes_it(headers: list[tuple[bytes, bytes]], target: bytes) -> None:
    headers = [(b"Host", b"example.com"), *[(k, v) for k, v in headers if k.lower() != b"host"]]
    conn = h11.Connection(h11.CLIENT)
    expected = conn.send(h11.Request(method=b"GET", target=target, headers=headers))
    assert encode_request(b"GET", target, headers) == expected


@settings(max_examples=200, deadline=None)
@given(HEADER_LISTS)
def test_a_101_head_is_written_as_h11_writes_it(headers: list[tuple[bytes, bytes]]) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    conn.next_event()
    conn.next_event()
    reply = h11.InformationalResponse(status_code=101, headers=headers, reason=b"Switching Protocols")
    assert encode_response(101, reply.reason, reply.headers.raw_items()) == conn.send(reply)

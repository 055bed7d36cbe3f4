"""proxy_protocol: PROXY v1/v2 headers, parsed incrementally and built for backends."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.protocol import proxy_protocol as pp

V2_LOCAL = pp.V2_SIGNATURE + bytes((0x20, 0x00, 0x00, 0x00))


def test_v1_tcp4() -> None:
    got = pp.parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n")
    assert got == pp.ProxyHeader(("192.0.2.7", 56324), ("10.0.0.1", 443), b"GET / HTTP/1.1\r\n")


def test_v1_tcp6() -> None:
    got = pp.parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert got is not None and got.source == ("2001:db8::1", 1) and got.dest == ("2001:db8::2", 65535)


def test_v1_unknown_keeps_the_peer_address() -> None:
    got = pp.parse(b"PROXY UNKNOWN\r\nrest")
    assert got == pp.ProxyHeader(None, None, b"rest")


def test_v2_local_keeps_the_peer_address() -> None:
    assert pp.parse(V2_LOCAL + b"x") == pp.ProxyHeader(None, None, b"x")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n",
        b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 0443 443\r\n",
        b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP6 fe80::1%a\nb ::1 1 2\r\n",  # a scope id: any bytes would become the client address
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY " + b"A" * 120,
        pp.V2_SIGNATURE + bytes((0x10, 0x11, 0x00, 0x0C)) + bytes(12),  # version 1 in a v2 header
        pp.V2_SIGNATURE + bytes((0x21, 0x11, 0x00, 0x04)) + bytes(4),  # address block too short
        pp.V2_SIGNATURE + bytes((0x21, 0x11, 0xFF, 0xFF)),  # over the length we read
        pp.V2_SIGNATURE + bytes((0x21, 0x31, 0x00, 0x00)),  # AF_UNIX
    ],
)
def test_bad_headers_are_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ValueError):
        pp.parse(data)


def test_a_partial_header_asks_for_more() -> None:
    whole = pp.build("v2", ("192.0.2.1", 1000), ("10.0.0.1", 443))
    for i in range(len(whole)):
        assert pp.parse(whole[:i]) is None
    whole = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n"
    for i in range(len(whole)):
        assert pp.parse(whole[:i]) is None


ports = st.integers(min_value=0, max_value=65535)


@given(st.sampled_from(["v1", "v2"]), st.sampled_from([4, 6]), st.data(), ports, ports)
def test_build_then_parse_round_trips(version: str, family: int, data: st.DataObject, sp: int, dp: int) -> None:
    src = str(data.draw(st.ip_addresses(v=family)))
    dst = str(data.draw(st.ip_addresses(v=family)))
    got = pp.parse(pp.build(version, (src, sp), (dst, dp)) + b"tail")
    assert got is not None
    assert got.source == (str(ipaddress.ip_address(src)), sp)
    assert got.dest == (str(ipaddress.ip_address(dst)), dp)
    assert got.rest == b"tail"


def test_mixed_families_are_mapped_to_ipv6() -> None:
    got = pp.parse(pp.build("v2", ("192.0.2.1", 5), ("::1", 443)))
    assert got is not None and got.source == (str(ipaddress.ip_address("::ffff:192.0.2.1")), 5)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_a_value_error(data: bytes) -> None:
    try:
        got = pp.parse(data)
    except ValueError as exc:
        assert str(exc)
    else:
        assert got is None or isinstance(got, pp.ProxyHeader)

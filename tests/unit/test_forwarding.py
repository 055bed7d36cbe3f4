"""Who the client is behind trusted proxies, and RFC 7239 quoting (protocol/forwarding.py)."""

from __future__ import annotations

import ipaddress

import pytest

from wsproxy.protocol.forwarding import Origin, forwarded_node, forwarded_value, parse_ip, resolve_client

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def xff(*values: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", v) for v in values]


def test_an_untrusted_peer_is_the_client_whatever_it_says() -> None:
    assert resolve_client("6.6.6.6", xff(b"1.2.3.4"), TRUSTED) == Origin("6.6.6.6", "6.6.6.6", False)
    assert resolve_client("10.0.0.1", xff(b"1.2.3.4"), ()) == Origin("10.0.0.1", "10.0.0.1", False)


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        (xff(b"1.2.3.4"), "1.2.3.4"),
        (xff(b"6.6.6.6, 1.2.3.4"), "1.2.3.4"),  # the left-most value is the client's own claim
        (xff(b"6.6.6.6, 1.2.3.4, 10.0.0.7"), "1.2.3.4"),  # trusted hops are skipped
        (xff(b"6.6.6.6", b"1.2.3.4, 10.9.9.9"), "1.2.3.4"),  # several headers are one list
        (xff(b"10.0.0.8, 10.0.0.7"), "10.0.0.8"),  # all trusted: the left-most
        (xff(b"6.6.6.6, garbage, 10.0.0.7"), "10.0.0.7"),  # not an address: stop at the last known
        (xff(b"[2001:db8::1]:4711, 10.0.0.7:80"), "2001:db8::1"),
        (xff(b"::ffff:1.2.3.4"), "1.2.3.4"),
        ([(b"X-Real-IP", b"1.2.3.4")], "1.2.3.4"),  # no chain: X-Real-IP
        ([(b"X-Real-IP", b"1.2.3.4"), *xff(b"5.6.7.8")], "5.6.7.8"),  # the chain wins
        ([], "10.0.0.1"),
    ],
)
def test_behind_a_trusted_peer_the_client_is_the_right_most_untrusted_address(
    headers: list[tuple[bytes, bytes]], client: str
) -> None:
    assert resolve_client("10.0.0.1", headers, TRUSTED) == Origin("10.0.0.1", client, True)


def test_ipv6_and_ipv4_mapped_peers_are_matched_against_the_list() -> None:
    assert resolve_client("::1", xff(b"1.2.3.4"), TRUSTED).client == "1.2.3.4"
    assert resolve_client("::ffff:10.1.1.1", xff(b"1.2.3.4"), TRUSTED).client == "1.2.3.4"


@pytest.mark.parametrize(
    ("text", "ip"),
    [("1.2.3.4", "1.2.3.4"), (" 1.2.3.4:80 ", "1.2.3.4"), ('"[::1]:80"', "::1"), ("::1", "::1"), ("unknown", None)],
)
def test_forwarding_values_parse_with_or_without_ports(text: str, ip: str | None) -> None:
    got = parse_ip(text)
    assert (str(got) if got is not None else None) == ip


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("http", "http"),
        ("example.com", "example.com"),
        ("example.com:8080", '"example.com:8080"'),
        ("x\\", '"x\\\\"'),
        ('a"b', '"a\\"b"'),
        ("", '""'),
        ("a b", '"a b"'),
    ],
)
def test_forwarded_values_are_tokens_or_quoted_strings(text: str, value: str) -> None:
    assert forwarded_value(text) == value


def test_forwarded_nodes_quote_ipv6_with_brackets() -> None:
    assert forwarded_node("192.0.2.43") == "192.0.2.43"
    assert forwarded_node("2001:db8::1") == '"[2001:db8::1]"'

"""allowed_origins patterns and subprotocol filtering (config/origins.py, policy/origin.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.config.origins import Origin, parse_origin, parse_origin_pattern, parse_subprotocol
from wsproxy.policy.origin import filter_subprotocols, origin_allowed

# (pattern, origin header, allowed?)
ORIGIN_TABLE = [
    ("https://app.example.com", "https://app.example.com", True),
    ("https://app.example.com", "HTTPS://App.Example.COM", True),
    ("https://app.example.com", "https://app.example.com:443", True),
    ("https://app.example.com:443", "https://app.example.com", True),
    ("https://app.example.com", "http://app.example.com", False),
    ("https://app.example.com", "https://app.example.com:8443", False),
    ("https://app.example.com", "https://evil.app.example.com", False),
    ("https://app.example.com", "https://app.example.com.evil.net", False),
    ("app.example.com", "http://app.example.com", True),
    ("app.example.com", "https://app.example.com", True),
    ("app.example.com", "https://app.example.com:8443", False),
    ("app.example.com:8443", "https://app.example.com:8443", True),
    ("app.example.com:8443", "http://app.example.com:8443", True),
    ("*.example.com", "https://a.example.com", True),
    ("*.example.com", "https://a.b.example.com", True),
    ("*.example.com", "https://example.com", False),
    ("*.example.com", "https://badexample.com", False),
    ("*.example.com", "https://example.com.evil.net", False),
    ("https://*.example.com", "http://a.example.com", False),
    ("http://localhost:3000", "http://localhost:3000", True),
    ("http://localhost:3000", "http://localhost:3001", False),
    ("http://[::1]:8080", "http://[::1]:8080", True),
    ("null", "null", True),
    ("null", "https://null", False),
    ("https://app.example.com", "null", False),
    ("https://app.example.com", "https://app.example.com/path", False),
    ("https://app.example.com", "https://app.example.com https://other.net", False),
    ("https://app.example.com", "garbage", False),
]


@pytest.mark.parametrize(("pattern", "origin", "allowed"), ORIGIN_TABLE)
def test_origin_table(pattern, origin, allowed):
    assert origin_allowed((parse_origin_pattern(pattern),), [origin.encode()]) is allowed


def test_no_origin_header_passes_and_two_origin_headers_do_not():
    patterns = (parse_origin_pattern("https://app.example.com"),)
    assert origin_allowed(patterns, []) is True
    assert origin_allowed(patterns, [b"https://app.example.com", b"https://app.example.com"]) is False


def test_any_pattern_in_the_list_may_match():
    patterns = tuple(parse_origin_pattern(p) for p in ("https://a.example.com", "*.example.org"))
    assert origin_allowed(patterns, [b"https://x.example.org"])
    assert not origin_allowed(patterns, [b"https://b.example.com"])


@pytest.mark.parametrize(
    "bad",
    ["", "  ", "*", "*.", "https://", "https://app.example.com/", "ht tp://x", "x:99999", "a..b", "*.*.example.com", 7],
)
def test_bad_patterns_are_config_errors(bad):
    with pytest.raises(ValueError):
        parse_origin_pattern(bad)


def test_pattern_prints_normalized():
    assert str(parse_origin_pattern("HTTPS://App.Example.com:443")) == "https://app.example.com"
    assert str(parse_origin_pattern("*.example.com:8443")) == "*.example.com:8443"
    assert str(parse_origin_pattern("null")) == "null"


def test_parse_origin():
    assert parse_origin(b"https://a.example.com:8443") == Origin("https", "a.example.com", 8443)
    assert parse_origin(b"https://a.example.com").effective_port == 443
    assert parse_origin(b"\xff\xfe") is None
    assert parse_origin("https://a.example.com:0") is None


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=80))
def test_any_origin_bytes_parse_or_are_refused_without_raising(value):
    origin = parse_origin(value)
    patterns = (parse_origin_pattern("*.example.com"), parse_origin_pattern("null"))
    allowed = origin_allowed(patterns, [value])
    assert allowed is False or origin is not None


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=4),
    scheme=st.sampled_from(["http", "https", "ws", "wss"]),
)
def test_a_wildcard_matches_exactly_the_strict_subdomains(labels, scheme):
    pattern = parse_origin_pattern("*.example.com")
    sub = ".".join(labels)
    assert origin_allowed((pattern,), [f"{scheme}://{sub}.example.com".encode()])
    assert not origin_allowed((pattern,), [f"{scheme}://{sub}example.com".encode()])
    assert not origin_allowed((pattern,), [f"{scheme}://example.com.{sub}".encode()])


def test_subprotocols_are_filtered_in_the_clients_order():
    assert filter_subprotocols(("b", "x", "a", "b"), ("a", "b")) == ("b", "a")
    assert filter_subprotocols(("X",), ("x",)) == ()  # names are case-sensitive
    assert filter_subprotocols((), ("a",)) == ()


@pytest.mark.parametrize("bad", ["", "a b", "a,b", "chat/1", None, 3])
def test_bad_subprotocol_names(bad):
    with pytest.raises(ValueError):
        parse_subprotocol(bad)

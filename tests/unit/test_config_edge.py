"""Config keys of edge protection (docs/security.md): defaults, shapes, and every error with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsproxy.config import ConfigError, RateLimit, defaults, parse_config, parse_rate

BASE = """\
listeners:
  - address: 127.0.0.1:0
    pool: p
{listener}pools:
  p:
    backends:
      - {{address: 127.0.0.1:9001{backend}}}
{pool}{top}"""


def cfg(*, listener: str = "", backend: str = "", pool: str = "", top: str = ""):
    return parse_config(BASE.format(listener=listener, backend=backend, pool=pool, top=top), source="t.yaml")


def problems(**parts: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        cfg(**parts)
    return dict(info.value.problems)


def test_everything_is_off_by_default():
    c = cfg()
    assert c.limits.max_sessions is None and c.pools["p"].max_sessions is None
    assert c.pools["p"].backends[0].max_sessions is None
    rl = c.rate_limits
    assert (rl.handshakes_per_ip, rl.max_sessions_per_ip, rl.messages, rl.bytes) == (None, None, None, None)
    assert rl.close_after == defaults.RATE_CLOSE_AFTER and rl.max_tracked_ips == defaults.MAX_TRACKED_IPS
    lst = c.listeners[0]
    assert (lst.allowed_origins, lst.allowed_subprotocols, lst.auth) == (None, None, None)
    assert c.limits.retry_after == defaults.RETRY_AFTER


def test_the_issues_example_parses():
    c = cfg(
        listener="    allowed_origins: [https://app.example.com, '*.example.com']\n"
        "    allowed_subprotocols: [chat.v2]\n"
        "    auth: {url: http://127.0.0.1:9100/check, timeout: 2s, pass_headers: [Authorization],"
        " copy_headers: [X-User-Id], cache: 30s}\n",
        backend=", max_sessions: 100",
        pool="    max_sessions: 1000\n",
        top="limits: {max_sessions: 10000}\n"
        "rate_limits:\n"
        "  handshakes_per_ip: {rate: 20/s, burst: 40}\n"
        "  max_sessions_per_ip: 50\n"
        "  messages: {rate: 100/s, burst: 200}\n"
        "  bytes: {rate: 1MiB/s, burst: 4MiB}\n"
        "  close_after: 5s\n",
    )
    rl = c.rate_limits
    assert rl.handshakes_per_ip == RateLimit(20.0, 40.0)
    assert rl.messages == RateLimit(100.0, 200.0)
    assert rl.bytes == RateLimit(float(1 << 20), float(4 << 20))
    assert (rl.max_sessions_per_ip, rl.close_after) == (50, 5.0)
    auth = c.listeners[0].auth
    assert auth is not None
    assert (auth.host, auth.port, auth.target, auth.timeout, auth.cache) == ("127.0.0.1", 9100, "/check", 2.0, 30.0)
    assert auth.pass_headers == ("authorization",) and auth.copy_headers == ("x-user-id",)
    assert c.limits.max_sessions == 10000 and c.pools["p"].max_sessions == 1000
    assert c.pools["p"].backends[0].max_sessions == 100


@pytest.mark.parametrize(
    ("value", "per_second"),
    [(20, 20.0), (2.5, 2.5), ("20/s", 20.0), ("600/m", 10.0), ("3600/h", 1.0), ("1.5/s", 1.5)],
)
def test_rates(value, per_second):
    assert parse_rate(value) == pytest.approx(per_second)


@pytest.mark.parametrize(("value", "per_second"), [("1MiB/s", 1 << 20), ("60KiB/m", 1024), ("100B/s", 100)])
def test_byte_rates(value, per_second):
    assert parse_rate(value, sizes=True) == pytest.approx(per_second)


def test_a_bare_rate_gets_one_seconds_burst():
    c = cfg(top="rate_limits: {messages: 50/s, handshakes_per_ip: 0.5/s}\n")
    assert c.rate_limits.messages == RateLimit(50.0, 50.0)
    assert c.rate_limits.handshakes_per_ip == RateLimit(0.5, 1.0)


def test_off_is_accepted_everywhere_a_limit_may_be_off():
    c = cfg(
        listener="    allowed_subprotocols: off\n    auth: off\n",
        backend=", max_sessions: off",
        pool="    max_sessions: off\n",
        top="limits: {max_sessions: off}\nrate_limits: {messages: off, bytes: off, handshakes_per_ip: off,"
        " max_sessions_per_ip: off, close_after: off}\n",
    )
    assert c.rate_limits.close_after is None and c.limits.max_sessions is None


# (parts, key path, words the message must contain)
ERRORS = [
    ({"top": "limits: {max_sessions: 0}\n"}, "limits.max_sessions", "whole number"),
    ({"top": "limits: {max_sessions: many}\n"}, "limits.max_sessions", "whole number"),
    ({"top": "limits: {retry_after: -1}\n"}, "limits.retry_after", "positive"),
    ({"pool": "    max_sessions: -5\n"}, "pools.p.max_sessions", "whole number"),
    ({"backend": ", max_sessions: 1.5"}, "pools.p.backends[0].max_sessions", "whole number"),
    ({"top": "rate_limits: {handshakes_per_ip: {rate: 20/x}}\n"}, "rate_limits.handshakes_per_ip.rate", "rate"),
    ({"top": "rate_limits: {handshakes_per_ip: {rate: 0}}\n"}, "rate_limits.handshakes_per_ip.rate", "positive"),
    ({"top": "rate_limits: {handshakes_per_ip: {burst: 4}}\n"}, "rate_limits.handshakes_per_ip.rate", "missing"),
    ({"top": "rate_limits: {handshakes_per_ip: {rate: 1, burst: 0.5}}\n"}, "rate_limits.handshakes_per_ip.burst", "1"),
    (
        {"top": "rate_limits: {handshakes_per_ip: {rate: 1, brust: 2}}\n"},
        "rate_limits.handshakes_per_ip.brust",
        "unknown",
    ),
    ({"top": "rate_limits: {messages: {rate: 1MiB/s}}\n"}, "rate_limits.messages.rate", "rate"),
    ({"top": "rate_limits: {bytes: {rate: 1MB/s}}\n"}, "rate_limits.bytes.rate", "rate"),
    ({"top": "rate_limits: {bytes: {rate: 1KiB/s, burst: 2KB}}\n"}, "rate_limits.bytes.burst", "size"),
    ({"top": "rate_limits: {max_sessions_per_ip: 0}\n"}, "rate_limits.max_sessions_per_ip", "whole number"),
    ({"top": "rate_limits: {close_after: soon}\n"}, "rate_limits.close_after", "duration"),
    ({"top": "rate_limits: {max_tracked_ips: 0}\n"}, "rate_limits.max_tracked_ips", "whole number"),
    ({"top": "rate_limits: {messagez: 1}\n"}, "rate_limits.messagez", "unknown"),
    ({"top": "rate_limits: [1]\n"}, "rate_limits", "mapping"),
    ({"listener": "    allowed_origins: []\n"}, "listeners[0].allowed_origins", "non-empty"),
    ({"listener": "    allowed_origins: https://a.example.com\n"}, "listeners[0].allowed_origins", "list"),
    ({"listener": "    allowed_origins: ['https://a.example.com/x']\n"}, "listeners[0].allowed_origins", "no path"),
    ({"listener": "    allowed_origins: ['*']\n"}, "listeners[0].allowed_origins", "host"),
    ({"listener": "    allowed_subprotocols: []\n"}, "listeners[0].allowed_subprotocols", "non-empty"),
    ({"listener": "    allowed_subprotocols: ['a b']\n"}, "listeners[0].allowed_subprotocols", "subprotocol"),
    ({"listener": "    auth: {timeout: 2s}\n"}, "listeners[0].auth.url", "missing"),
    ({"listener": "    auth: {url: https://a/check}\n"}, "listeners[0].auth.url", "http://"),
    ({"listener": "    auth: {url: 'http://u:p@a/check'}\n"}, "listeners[0].auth.url", "without user"),
    ({"listener": "    auth: {url: 'http://a:99999/'}\n"}, "listeners[0].auth.url", "not a URL"),
    ({"listener": "    auth: {url: http://a/, timeout: 0}\n"}, "listeners[0].auth.timeout", "positive"),
    ({"listener": "    auth: {url: http://a/, pass_headers: [Host]}\n"}, "listeners[0].auth.pass_headers", "Host"),
    (
        {"listener": "    auth: {url: http://a/, copy_headers: [X-Forwarded-For]}\n"},
        "listeners[0].auth.copy_headers",
        "set by",
    ),
    (
        {"listener": "    auth: {url: http://a/, copy_headers: [Sec-WebSocket-Accept]}\n"},
        "listeners[0].auth.copy_headers",
        "set by",
    ),
    (
        {"listener": "    auth: {url: http://a/, copy_headers: ['bad header']}\n"},
        "listeners[0].auth.copy_headers",
        "header",
    ),
    ({"listener": "    auth: {url: http://a/, cache: forever}\n"}, "listeners[0].auth.cache", "duration"),
    ({"listener": "    auth: {url: http://a/, cache_entries: 0}\n"}, "listeners[0].auth.cache_entries", "whole number"),
    ({"listener": "    auth: {url: http://a/, cahce: 1s}\n"}, "listeners[0].auth.cahce", "unknown"),
    ({"listener": "    auth: [http://a/]\n"}, "listeners[0].auth", "mapping"),
]


@pytest.mark.parametrize(("parts", "path", "words"), [pytest.param(*e, id=e[1]) for e in ERRORS])
def test_errors_name_the_key_path(parts, path, words):
    found = problems(**parts)
    assert path in found, found
    assert words.lower() in found[path].lower(), found[path]


def test_route_level_keys_and_their_errors():
    text = """\
listeners:
  - address: 127.0.0.1:0
    routes:
      - {pool: p, allowed_subprotocols: [x, x, y], auth: {url: 'http://a:81/c?x=1'}}
      - {pool: p, allowed_subprotocols: nope}
      - {pool: p, auth: {url: ftp://a/}}
pools:
  p: {backends: [127.0.0.1:9001]}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml")
    found = dict(info.value.problems)
    assert set(found) == {"listeners[0].routes[1].allowed_subprotocols", "listeners[0].routes[2].auth.url"}
    good = parse_config(text.replace("nope", "[z]").replace("ftp", "http"), source="t.yaml")
    r0 = good.listeners[0].routes[0]
    assert r0.allowed_subprotocols == ("x", "y")
    assert r0.auth is not None and (r0.auth.port, r0.auth.target) == (81, "/c?x=1")


def test_every_edge_key_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = [
        "allowed_origins",
        "allowed_subprotocols",
        "auth",
        "backends[].max_sessions",
        "max_sessions",
        "retry_after",
        "handshakes_per_ip",
        "max_sessions_per_ip",
        "messages",
        "bytes",
        "close_after",
        "max_tracked_ips",
        "url",
        "timeout",
        "pass_headers",
        "copy_headers",
        "cache",
        "cache_entries",
    ]
    assert [k for k in keys if f"| `{k}` |" not in doc] == []
    edge = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text(encoding="utf-8")
    for limit in ("handshakes_per_ip", "max_sessions_per_ip", "close_after", "allowed_origins", "max_tracked_ips"):
        assert limit in edge


# --- listeners[].backlog -----------------------------------------------------------------------


def test_listener_backlog_defaults_to_a_storm_sized_queue_and_takes_a_number() -> None:
    text = "listeners:\n  - address: 127.0.0.1:0\n    pool: p\n{extra}pools:\n  p:\n    backends: [127.0.0.1:9001]\n"
    assert parse_config(text.format(extra=""), source="t.yaml").listeners[0].backlog == 4096
    assert parse_config(text.format(extra="    backlog: 64\n"), source="t.yaml").listeners[0].backlog == 64
    for bad in ("0", "70000", "lots", "true"):
        with pytest.raises(ConfigError) as info:
            parse_config(text.format(extra=f"    backlog: {bad}\n"), source="t.yaml")
        assert "1..65535" in dict(info.value.problems)["listeners[0].backlog"]

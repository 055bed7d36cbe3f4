"""Config keys and messages of issue 17: trusted proxies, query redaction, the admin Host check,
duplicate keys, and the messages that used to point the wrong way."""

from __future__ import annotations

import ipaddress

import pytest

from wsproxy.config import ConfigError, defaults, parse_config

BASE = """\
listeners:
  - address: 127.0.0.1:0
    pool: p
{listener}pools:
  p:
    backends:
      - 127.0.0.1:9001
{top}"""


def cfg(*, listener: str = "", top: str = ""):
    return parse_config(BASE.format(listener=listener, top=top), source="t.yaml")


def problems(text: str | None = None, **parts: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml") if text is not None else cfg(**parts)
    return dict(info.value.problems)


# --- listeners[].trusted_proxies ---------------------------------------------------------------


def test_trusted_proxies_default_to_none() -> None:
    assert cfg().listeners[0].trusted_proxies == defaults.TRUSTED_PROXIES == ()


def test_trusted_proxies_take_cidrs_and_single_addresses() -> None:
    lst = cfg(listener='    trusted_proxies: ["10.0.0.0/8", "192.0.2.7", "::1", "fd00::/8"]\n').listeners[0]
    assert lst.trusted_proxies == tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.7/32", "::1/128", "fd00::/8")
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('"10.0.0.0/8"', "expected a list"),
        ('["10.0.0.1/8"]', "host bits set"),
        ('["proxy.example"]', "not an address or CIDR"),
        ("[8]", "a string"),
    ],
)
def test_bad_trusted_proxies_name_the_key(value: str, says: str) -> None:
    got = problems(listener=f"    trusted_proxies: {value}\n")
    assert says in got["listeners[0].trusted_proxies"]


# --- log.query ---------------------------------------------------------------------------------


def test_log_query_defaults_to_redact_and_takes_the_three_modes() -> None:
    assert cfg().log.query == defaults.LOG_QUERY == "redact"
    for mode in ("redact", "keep", "drop"):
        assert cfg(top=f"log: {{query: {mode}}}\n").log.query == mode
    assert "expected one of redact, keep, drop" in problems(top="log: {query: hide}\n")["log.query"]


# --- admin.hosts -------------------------------------------------------------------------------


def test_admin_hosts_default_to_none_and_take_names_and_addresses() -> None:
    assert cfg(top="admin: {address: 127.0.0.1:0}\n").admin.hosts == defaults.ADMIN_HOSTS == ()
    got = cfg(top="admin: {address: 127.0.0.1:0, hosts: [Metrics.Internal., 10.0.0.5, '[::1]', '::2']}\n")
    assert got.admin.hosts == ("metrics.internal", "10.0.0.5", "::1", "::2")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("metrics.internal", "expected a list"),
        ("[metrics.internal:9900]", "without a port"),
        ("['http://x']", "scheme"),
    ],
)
def test_bad_admin_hosts_name_the_key(value: str, says: str) -> None:
    assert says in problems(top=f"admin: {{address: 127.0.0.1:0, hosts: {value}}}\n")["admin.hosts"]


# --- duplicate keys and messages that point the right way ---------------------------------------


def test_a_key_given_twice_in_one_mapping_is_an_error_naming_both_lines() -> None:
    text = "listeners:\n  - address: 127.0.0.1:0\n    pool: p\n    address: 127.0.0.1:1\n"
    text += "pools: {p: {backends: [127.0.0.1:9]}}\n"
    (message,) = problems(text).values()
    assert "'address' is given twice" in message and "line 2 and line 4" in message


def test_a_top_level_key_given_twice_is_an_error() -> None:
    text = "pools: {p: {backends: [127.0.0.1:9]}}\nlisteners: [{address: 127.0.0.1:0, pool: p}]\npools: {}\n"
    (message,) = problems(text).values()
    assert "'pools' is given twice" in message and "line 1 and line 3" in message


def test_merge_keys_still_override_without_an_error() -> None:
    text = (
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        "pools:\n  p:\n    backends:\n      - &b {address: 127.0.0.1:9001, weight: 1}\n"
        "      - {<<: *b, address: 127.0.0.1:9002}\n"
    )
    backends = parse_config(text).pools["p"].backends
    assert [str(b.address) for b in backends] == ["127.0.0.1:9001", "127.0.0.1:9002"]


@pytest.mark.parametrize(
    ("listener_address", "says"),
    [
        ("http://127.0.0.1:9000", "addresses are host:port without a scheme: '127.0.0.1:9000'"),
        ("'ws://[::1]:9000/'", "without a scheme: '[::1]:9000'"),
        ("9000", 'expected host:port such as "127.0.0.1:9000", got the bare number 9000'),
    ],
)
def test_address_messages_say_what_an_address_is(listener_address: str, says: str) -> None:
    text = f"listeners: [{{address: {listener_address}, pool: p}}]\npools: {{p: {{backends: [127.0.0.1:9]}}}}\n"
    assert says in problems(text)["listeners[0].address"]


def test_a_bare_number_as_a_backend_names_both_forms() -> None:
    text = "listeners: [{address: 127.0.0.1:0, pool: p}]\npools: {p: {backends: [9001]}}\n"
    message = problems(text)["pools.p.backends[0]"]
    assert '"host:port"' in message and "a mapping such as {address:" in message and "9001" in message

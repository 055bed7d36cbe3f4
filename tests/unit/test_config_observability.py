"""The `admin` and `log` config keys: defaults, loopback-only admin, every error with its key path."""

from __future__ import annotations

import pytest

from wsproxy.config import Address, ConfigError, defaults, parse_config

BASE = "listeners: [{address: 127.0.0.1:0, pool: p}]\npools: {p: {backends: [127.0.0.1:9001]}}\n"


def test_admin_is_off_and_log_is_text_info_when_absent() -> None:
    config = parse_config(BASE)
    assert config.admin is None
    assert (config.log.format, config.log.level) == (defaults.LOG_FORMAT, defaults.LOG_LEVEL) == ("text", "info")


@pytest.mark.parametrize("address", ["127.0.0.1:9900", "127.0.0.2:0", "localhost:9900", "[::1]:9900"])
def test_loopback_admin_addresses_need_no_allow_remote(address: str) -> None:
    config = parse_config(BASE + f'admin: {{address: "{address}"}}\n')
    assert config.admin is not None and config.admin.allow_remote is False
    assert config.admin.address.is_loopback


def test_a_public_admin_address_with_allow_remote() -> None:
    config = parse_config(BASE + "admin: {address: 0.0.0.0:9900, allow_remote: true}\n")
    assert config.admin is not None and config.admin.address == Address("0.0.0.0", 9900)


def test_json_log_at_debug() -> None:
    config = parse_config(BASE + "log: {format: json, level: debug}\n")
    assert (config.log.format, config.log.level) == ("json", "debug")


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("admin: {address: 0.0.0.0:9900}", "admin.address", "allow_remote: true"),
        ('admin: {address: "[::]:9900", allow_remote: false}', "admin.address", "not a loopback address"),
        ("admin: {address: admin.example.com:9900}", "admin.address", "not a loopback address"),
        ("admin: {}", "admin.address", "missing"),
        ("admin: {address: 9900}", "admin.address", "host:port"),
        ("admin: {address: 127.0.0.1:9900, allow_remote: 1}", "admin.allow_remote", "true or false"),
        ("admin: {address: 127.0.0.1:9900, port: 1}", "admin.port", "unknown key"),
        ("admin: 127.0.0.1:9900", "admin", "expected a mapping"),
        ("log: {format: xml}", "log.format", "text, json"),
        ("log: {level: verbose}", "log.level", "debug, info, warning, error"),
        ("log: {colour: true}", "log.colour", "unknown key"),
        ("log: json", "log", "expected a mapping"),
    ],
)
def test_admin_and_log_errors_name_the_key_path(extra: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + extra + "\n")
    problems = err.value.problems
    assert any(p == path and words in msg for p, msg in problems), problems
    assert len(problems) == 1, problems


def test_admin_with_several_workers_needs_a_fixed_port_range() -> None:
    fixed = BASE.replace("127.0.0.1:0", "127.0.0.1:8080")
    config = parse_config(fixed + "workers: 2\nadmin: {address: 127.0.0.1:9900}\n")
    assert config.admin is not None and config.admin.address.port == 9900  # worker i: 9900 + i
    for admin in ("127.0.0.1:0", "127.0.0.1:65535"):
        with pytest.raises(ConfigError) as err:
            parse_config(fixed + f"workers: 2\nadmin: {{address: {admin}}}\n")
        assert [p for p, _ in err.value.problems] == ["admin.address"]
        assert "port + i" in err.value.problems[0][1]

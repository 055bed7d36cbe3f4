"""Configuration of health checks, passive ejection and closing sessions on down: values and key paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.config import (
    ActiveHealth,
    Config,
    ConfigError,
    PassiveHealth,
    defaults,
    parse_config,
)
from wsproxy.config.pools import ACTIVE_KEYS as _ACTIVE_KEYS
from wsproxy.config.pools import HEALTH_POOL_KEYS
from wsproxy.config.pools import PASSIVE_KEYS as _PASSIVE_KEYS


def config_with(pool_extra: str) -> str:
    lines = [
        "listeners:",
        "  - {address: 127.0.0.1:0, pool: chat}",
        "pools:",
        "  chat:",
        "    backends: [127.0.0.1:9001]",
    ]
    lines += ["    " + line for line in pool_extra.strip().splitlines()]
    return "\n".join(lines) + "\n"


def problems(pool_extra: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(pool_extra), source="h.yaml")
    return dict(info.value.problems)


def test_without_health_there_are_no_active_checks_and_passive_has_defaults() -> None:
    pool = parse_config(config_with(""), source="h.yaml").pools["chat"]
    assert pool.health is None
    assert pool.passive == PassiveHealth(
        failures=defaults.PASSIVE_FAILURES,
        window=defaults.PASSIVE_WINDOW,
        eject_for=defaults.PASSIVE_EJECT_FOR,
        max_eject_for=defaults.PASSIVE_MAX_EJECT_FOR,
    )
    assert pool.close_sessions_on_down is False and pool.drain_window == defaults.DOWN_DRAIN_WINDOW


def test_the_issue_example_parses() -> None:
    pool = parse_config(
        config_with(
            """
health:
  interval: 2s
  timeout: 1s
  rise: 2          # consecutive successes to mark up
  fall: 3          # consecutive failures to mark down
  check: websocket # tcp | http | websocket
  path: /healthz
  slow_start: 30s
passive: {failures: 3, window: 10s, eject_for: 30s}
close_sessions_on_down: true
drain_window: 5s
"""
        ),
        source="h.yaml",
    ).pools["chat"]
    assert pool.health == ActiveHealth(
        interval=2.0, timeout=1.0, rise=2, fall=3, check="websocket", path="/healthz", slow_start=30.0
    )
    assert pool.passive == PassiveHealth(failures=3, window=10.0, eject_for=30.0, max_eject_for=300.0)
    assert pool.close_sessions_on_down is True and pool.drain_window == 5.0


def test_an_empty_health_mapping_turns_checks_on_with_defaults() -> None:
    pool = parse_config(config_with("health: {}"), source="h.yaml").pools["chat"]
    assert pool.health == ActiveHealth()
    assert pool.health.check == "tcp" and pool.health.slow_start is None


def test_the_default_timeout_never_exceeds_a_short_interval() -> None:
    pool = parse_config(config_with("health: {interval: 200ms}"), source="h.yaml").pools["chat"]
    assert pool.health is not None and pool.health.timeout == 0.2


@pytest.mark.parametrize("off", ["off", "false"])
def test_passive_can_be_turned_off(off: str) -> None:
    assert parse_config(config_with(f"passive: {off}"), source="h.yaml").pools["chat"].passive is None


def test_a_short_eject_for_lowers_nothing_but_a_long_one_raises_the_default_cap() -> None:
    pool = parse_config(config_with("passive: {eject_for: 10m}"), source="h.yaml").pools["chat"]
    assert pool.passive is not None and pool.passive.max_eject_for == 600.0


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("health: {interval: 0}", "pools.chat.health.interval", "positive"),
        ("health: {timeout: 3s, interval: 1s}", "pools.chat.health.timeout", "longer than the interval"),
        ("health: {rise: 0}", "pools.chat.health.rise", "1..100"),
        ("health: {fall: true}", "pools.chat.health.fall", "1..100"),
        ("health: {check: grpc}", "pools.chat.health.check", "tcp, http, websocket"),
        ("health: {check: http, path: healthz}", "pools.chat.health.path", "starting with /"),
        ("health: {check: http, path: /a b}", "pools.chat.health.path", "no spaces"),
        ("health: {path: /healthz}", "pools.chat.health.path", "check is tcp"),
        ("health: {slow_start: soon}", "pools.chat.health.slow_start", "duration"),
        ("health: {interval: 1s, intervall: 2s}", "pools.chat.health.intervall", "unknown key"),
        ("health: 5", "pools.chat.health", "expected a mapping"),
        ("passive: {failures: 0}", "pools.chat.passive.failures", "1..100"),
        ("passive: {window: -1s}", "pools.chat.passive.window", "duration"),
        ("passive: {eject_for: 1m, max_eject_for: 30s}", "pools.chat.passive.max_eject_for", "shorter than eject_for"),
        ("passive: {ejectfor: 1s}", "pools.chat.passive.ejectfor", "unknown key"),
        ("passive: on", "pools.chat.passive", "expected a mapping"),
        ("close_sessions_on_down: yes please", "pools.chat.close_sessions_on_down", "true or false"),
        ("close_sessions_on_down: true", "pools.chat.close_sessions_on_down", "needs active health checks"),
        ("drain_window: 5s", "pools.chat.drain_window", "only meaningful with close_sessions_on_down"),
        (
            "health: {}\nclose_sessions_on_down: true\ndrain_window: 0s",
            "pools.chat.drain_window",
            "positive",
        ),
    ],
)
def test_bad_values_are_reported_with_their_key_path(extra: str, path: str, words: str) -> None:
    found = problems(extra)
    assert path in found, found
    assert words in found[path]


def test_every_problem_is_reported_at_once() -> None:
    found = problems("health: {rise: 0, fall: 0, check: x}\npassive: {failures: 0}")
    assert {
        "pools.chat.health.rise",
        "pools.chat.health.fall",
        "pools.chat.health.check",
        "pools.chat.passive.failures",
    } <= set(found)


_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["off", "1s", "250ms", "tcp", "http", "websocket", "/healthz", "x", "", "/a b"]),
    st.lists(st.integers(), max_size=2),
)
_HEALTH = st.one_of(
    _VALUE,
    st.dictionaries(
        st.sampled_from(["interval", "timeout", "rise", "fall", "check", "path", "slow_start", "bogus"]), _VALUE
    ),
)
_PASSIVE = st.one_of(
    _VALUE,
    st.dictionaries(st.sampled_from(["failures", "window", "eject_for", "max_eject_for", "bogus"]), _VALUE),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.fixed_dictionaries(
        {"backends": st.just(["127.0.0.1:9001"])},
        optional={
            "health": _HEALTH,
            "passive": _PASSIVE,
            "close_sessions_on_down": _VALUE,
            "drain_window": _VALUE,
        },
    )
)
def test_health_keys_only_ever_raise_config_error(pool: dict) -> None:  # type: ignore[type-arg]
    text = yaml.safe_dump({"listeners": [{"address": "127.0.0.1:0", "pool": "chat"}], "pools": {"chat": pool}})
    try:
        result = parse_config(text, source="fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        assert all(path.startswith("pools.chat") for path, _ in exc.problems), exc.problems
        return
    assert isinstance(result, Config)
    health = result.pools["chat"].health
    if health is not None:
        assert 0 < health.timeout <= health.interval and health.rise >= 1 and health.fall >= 1


def test_every_health_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = [*HEALTH_POOL_KEYS, *(f"health.{k}" for k in _ACTIVE_KEYS), *(f"passive.{k}" for k in _PASSIVE_KEYS)]
    assert [k for k in keys if f"| `{k}` |" not in doc] == []

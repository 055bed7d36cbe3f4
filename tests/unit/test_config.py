"""Configuration: valid shapes parse into typed values; every error names the file, key path and problem.

Also the command line around it (`wsproxy check`, `--version`) and two properties: parse_config only
ever raises ConfigError, and parse_duration only ever returns a positive float or raises ValueError.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import wsproxy
from tests.support import make_tls_files
from wsproxy.config import Address, Config, ConfigError, parse_address, parse_config, parse_duration

REPO = Path(__file__).resolve().parents[2]

ISSUE_EXAMPLE = """\
listeners:
  - address: 127.0.0.1:8080        # host:port, [::1]:8080 for IPv6
    pool: chat
  - address: 127.0.0.1:8443
    pool: chat
    tls: {cert: certs/demo-cert.pem, key: certs/demo-key.pem}
pools:
  chat:
    balance: round_robin
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
        weight: 2
timeouts:
  connect: 5s
  handshake: 10s
limits:
  max_header_bytes: 16384
"""

MINIMAL = """\
listeners:
  - address: 127.0.0.1:8080
    pool: chat
pools:
  chat:
    backends:
      - address: 127.0.0.1:9001
"""


def _with_certs(tmp_path: Path) -> Path:
    """The issue's example written next to real cert files under certs/ (relative paths)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    files = make_tls_files(certs)
    files.cert.rename(certs / "demo-cert.pem")
    files.key.rename(certs / "demo-key.pem")
    path = tmp_path / "wsproxy.yaml"
    path.write_text(ISSUE_EXAMPLE)
    return path


def _problems(text: str, base_dir: Path | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml", base_dir=base_dir)
    return dict(info.value.problems)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsproxy", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )


# --------------------------------------------------------------------------------------------
# valid configurations


def test_issue_example_parses_into_typed_values(tmp_path: Path) -> None:
    path = _with_certs(tmp_path)
    config = parse_config(path.read_text(), source=str(path), base_dir=tmp_path)
    assert isinstance(config, Config)
    assert [str(lst.address) for lst in config.listeners] == ["127.0.0.1:8080", "127.0.0.1:8443"]
    assert [lst.pool for lst in config.listeners] == ["chat", "chat"]
    assert config.listeners[0].tls is None
    tls = config.listeners[1].tls
    assert tls is not None
    assert tls.cert == tmp_path / "certs" / "demo-cert.pem"
    assert tls.key == tmp_path / "certs" / "demo-key.pem"
    pool = config.pools["chat"]
    assert pool.balance == "round_robin"
    assert [(b.address, b.weight) for b in pool.backends] == [
        (Address("127.0.0.1", 9001), 1),
        (Address("127.0.0.1", 9002), 2),
    ]
    assert config.timeouts.connect == 5.0
    assert config.timeouts.handshake == 10.0
    assert config.limits.max_header_bytes == 16384


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.timeouts.connect == 5.0
    assert config.timeouts.handshake == 10.0
    assert config.limits.max_header_bytes == 16384
    assert config.listeners[0].deflate is True
    assert config.pools["chat"].balance == "round_robin"
    assert config.pools["chat"].backends[0].weight == 1


def test_config_objects_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.timeouts.connect = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.listeners[0].deflate = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("7", 7.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    value = text if isinstance(text, int | float) else f'"{text}"'
    config = parse_config(MINIMAL + f"timeouts: {{connect: {value}, handshake: {value}}}\n")
    assert config.timeouts.connect == pytest.approx(seconds)
    assert config.timeouts.handshake == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10 seconds", "-1s", "0", 0, -5, "1d", "", "ms", "abc", True, None, [1], "1e3s"])
def test_bad_durations_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_ipv6_listener_and_backend_addresses() -> None:
    text = """\
listeners:
  - address: "[::1]:8080"
    pool: p
pools:
  p:
    backends:
      - address: "[::1]:9001"
      - "[2001:db8::7]:9002"
"""
    config = parse_config(text)
    assert config.listeners[0].address == Address("::1", 8080)
    assert str(config.listeners[0].address) == "[::1]:8080"
    assert [b.address for b in config.pools["p"].backends] == [
        Address("::1", 9001),
        Address("2001:db8::7", 9002),
    ]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("localhost:65535", Address("localhost", 65535)),
        ("[::1]:1", Address("::1", 1)),
        ("backend.internal:9001", Address("backend.internal", 9001)),
    ],
)
def test_addresses_parse(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "bad",
    [
        "9001",
        "::1:8080",
        "[::1]8080",
        "[nothex]:80",
        "host:",
        ":80",
        "host:http",
        "host:70000",
        "host:0",
        9001,
        None,
    ],
)
def test_bad_addresses_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_listener_port_zero_is_allowed_backend_port_zero_is_not() -> None:
    parse_config(MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0"))
    problems = _problems(MINIMAL.replace("127.0.0.1:9001", "127.0.0.1:0"))
    assert "pools.chat.backends[0].address" in problems


# --------------------------------------------------------------------------------------------
# errors: key path and what is wrong


def test_bad_backend_address_names_its_key_path() -> None:
    text = MINIMAL + "      - address: 9001\n"
    problems = _problems(text.replace("address: 9001", 'address: "9001"'))
    assert list(problems) == ["pools.chat.backends[1].address"]
    assert "host:port" in problems["pools.chat.backends[1].address"]
    assert "9001" in problems["pools.chat.backends[1].address"]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (MINIMAL + "listners: []\n", "listners"),
        (MINIMAL.replace("    pool: chat", "    pool: chat\n    tsl: {}"), "listeners[0].tsl"),
        (
            MINIMAL.replace("    backends:", "    balence: round_robin\n    backends:"),
            "pools.chat.balence",
        ),
        (MINIMAL + "        wieght: 2\n", "pools.chat.backends[0].wieght"),
        (MINIMAL + "timeouts: {conect: 5s}\n", "timeouts.conect"),
        (MINIMAL + "limits: {max_headers: 1}\n", "limits.max_headers"),
        (MINIMAL + "shutdown: {dedline: 1s}\n", "shutdown.dedline"),
        (
            MINIMAL.replace("    pool: chat", "    pool: chat\n    tls: {cert: a, key: b, ca: c}"),
            "listeners[0].tls.ca",
        ),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(text: str, path: str) -> None:
    problems = _problems(text)
    assert path in problems, problems
    assert "unknown" in problems[path]


def test_listener_naming_undefined_pool() -> None:
    problems = _problems(MINIMAL.replace("pool: chat", "pool: chta"))
    assert "listeners[0].pool" in problems
    assert "chta" in problems["listeners[0].pool"]


@pytest.mark.parametrize("bad", ['"10 seconds"', '"-1s"', "0", '"soon"', "true"])
def test_bad_duration_names_its_key(bad: str) -> None:
    problems = _problems(MINIMAL + f"timeouts: {{handshake: {bad}}}\n")
    assert list(problems) == ["timeouts.handshake"]
    assert "duration" in problems["timeouts.handshake"]


def test_missing_listeners_is_an_error() -> None:
    problems = _problems("pools:\n  chat:\n    backends: [127.0.0.1:9001]\n")
    assert "listeners" in problems


def test_missing_pools_is_an_error() -> None:
    problems = _problems("listeners:\n  - address: 127.0.0.1:8080\n    pool: chat\n")
    assert "pools" in problems


def test_empty_file_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("", source="empty.yaml")
    assert info.value.problems


def test_pool_without_backends_is_an_error() -> None:
    problems = _problems("listeners:\n  - address: 127.0.0.1:8080\n    pool: chat\npools:\n  chat:\n    backends: []\n")
    assert "pools.chat.backends" in problems


def test_several_errors_are_reported_at_once() -> None:
    text = """\
listeners:
  - address: 8080
    pool: nope
pools:
  chat:
    balance: fastest
    backends:
      - address: 127.0.0.1:9001
      - address: "9001"
        weight: 0
timeouts:
  connect: forever
limits:
  max_header_bytes: 10
surprise: 1
"""
    problems = _problems(text)
    for path in (
        "listeners[0].address",
        "listeners[0].pool",
        "pools.chat.balance",
        "pools.chat.backends[1].address",
        "pools.chat.backends[1].weight",
        "timeouts.connect",
        "limits.max_header_bytes",
        "surprise",
    ):
        assert path in problems, f"{path} not reported; got {list(problems)}"


def test_missing_tls_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    text = MINIMAL.replace("    pool: chat", "    pool: chat\n    tls: {cert: nowhere.pem, key: nokey.pem}")
    problems = _problems(text, base_dir=tmp_path)
    assert "nowhere.pem" in problems["listeners[0].tls.cert"]
    assert "nokey.pem" in problems["listeners[0].tls.key"]


def test_render_names_the_file_and_every_key_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(MINIMAL.replace("127.0.0.1:9001", "9001") + "bogus: 1\n")
    from wsproxy.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(path)
    rendered = info.value.render()
    assert str(path) in rendered
    assert "pools.chat.backends[0].address" in rendered
    assert "bogus" in rendered


def test_invalid_yaml_is_a_config_error_with_position() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listeners: [\n  - {address: 1\n", source="bad.yaml")
    assert "bad.yaml" in info.value.render()
    assert "line" in info.value.render()


def test_huge_integer_duration_is_a_config_error() -> None:
    """A 400-digit number of seconds must be reported, not crash the parser (OverflowError)."""
    problems = _problems(MINIMAL + "timeouts: {connect: " + "9" * 400 + "}\n")
    assert "timeouts.connect" in problems


def test_overlong_tls_path_is_a_config_error(tmp_path: Path) -> None:
    """A path the OS cannot even stat (ENAMETOOLONG) is a bad value, not a crash (OSError)."""
    text = MINIMAL.replace("    pool: chat", "    pool: chat\n    tls: {cert: " + "c" * 300 + ", key: k.pem}")
    problems = _problems(text, base_dir=tmp_path)
    assert "listeners[0].tls.cert" in problems


def test_deeply_nested_yaml_is_a_config_error() -> None:
    """Pathological nesting must give a ConfigError, not a RecursionError from the YAML loader."""
    with pytest.raises(ConfigError):
        parse_config("listeners: " + "[" * 3000 + "]" * 3000 + "\n")


@pytest.mark.parametrize("reference", ['pool: "2024"', "routes: [{pool: chat}]"])
def test_numeric_pool_name_is_reported_not_a_crash(reference: str) -> None:
    """YAML reads `2024:` as an int: that must be a ConfigError naming the pool, not a TypeError."""
    lines = ["listeners:", "  - address: 127.0.0.1:8080", f"    {reference}", "pools:", "  2024:"]
    text = "\n".join([*lines, "    backends: [127.0.0.1:9001]", ""])
    try:
        config = parse_config(text, source="t.yaml")
    except ConfigError as exc:
        assert "pools.2024" in dict(exc.problems), exc.problems
    else:  # accepting the name as the string "2024" is also fine
        assert list(config.pools) == ["2024"]


# --------------------------------------------------------------------------------------------
# the command line


def test_check_valid_file_exits_0_with_summary(tmp_path: Path) -> None:
    path = _with_certs(tmp_path)
    result = _run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in (
        "127.0.0.1:8080",
        "127.0.0.1:8443",
        "chat",
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "round_robin",
    ):
        assert needle in out, f"{needle} missing from summary:\n{out}"
    assert len(out.splitlines()) <= 40  # one screen


def test_check_accepts_long_config_option(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    result = _run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_invalid_file_exits_2_with_key_paths(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + '      - address: "9001"\n' + "timeouts: {handshake: soon}\nextra_key: 1\n")
    result = _run_cli("check", "-c", str(path))
    assert result.returncode == 2
    err = result.stderr
    assert str(path) in err
    for key in ("pools.chat.backends[1].address", "timeouts.handshake", "extra_key"):
        assert key in err, f"{key} missing from:\n{err}"
    assert "Traceback" not in err


def test_check_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = _run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_version_prints_the_version() -> None:
    result = _run_cli("--version")
    assert result.returncode == 0
    assert wsproxy.__version__ in result.stdout


# --------------------------------------------------------------------------------------------
# properties

_VOCAB = [
    "listeners",
    "pools",
    "timeouts",
    "limits",
    "shutdown",
    "address",
    "pool",
    "routes",
    "tls",
    "deflate",
    "backends",
    "balance",
    "weight",
    "retries",
    "hash_key",
    "hash_balance_factor",
    "hash_fallback",
    "cert",
    "key",
    "connect",
    "handshake",
    "close",
    "max_header_bytes",
    "buffer_bytes",
    "deadline",
    "match",
    "host",
    "path_prefix",
    "chat",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "127.0.0.1:9001",
            "[::1]:80",
            "10s",
            "250ms",
            "round_robin",
            "consistent_hash",
            "chat",
            "header:x-user",
            "cookie:",
            "/chat",
            "*.example.com",
            "0",
            "-1",
        ]
    ),
)
_KEYS = st.one_of(st.sampled_from(_VOCAB), st.text(max_size=10), st.integers(-3, 3))
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.one_of(_TREES, st.dictionaries(st.sampled_from(_VOCAB), _TREES, max_size=5)))
@example(tree={"timeouts": {"connect": 10**400}})
def test_parse_config_raises_only_config_error(tree: object) -> None:
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        result = parse_config(text, source="fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and isinstance(m, str) and m for p, m in exc.problems)
        return
    assert isinstance(result, Config)


def _optional(fields: dict) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.fixed_dictionaries({}, optional=fields)


_ANY = st.one_of(_TREES, _SCALARS)
_LISTENER = _optional(
    {
        "address": st.one_of(st.just("127.0.0.1:0"), _ANY),
        "pool": st.one_of(st.just("chat"), _ANY),
        "routes": st.lists(
            _optional(
                {
                    "pool": st.one_of(st.just("chat"), _ANY),
                    "match": st.one_of(_ANY, _optional({"host": _ANY, "path_prefix": _ANY})),
                }
            ),
            max_size=3,
        ),
        "tls": st.one_of(_ANY, _optional({"cert": _ANY, "key": _ANY})),
        "deflate": _ANY,
    }
)
_POOL = _optional(
    {
        "backends": st.one_of(
            _ANY,
            st.lists(st.one_of(_ANY, _optional({"address": _ANY, "weight": _ANY})), max_size=3),
        ),
        "balance": st.one_of(st.sampled_from(["round_robin", "consistent_hash", "least_conn"]), _ANY),
        "retries": _ANY,
        "hash_key": _ANY,
        "hash_balance_factor": _ANY,
        "hash_fallback": _ANY,
    }
)
_CONFIG_SHAPED = _optional(
    {
        "listeners": st.one_of(_ANY, st.lists(_LISTENER, max_size=3)),
        "pools": st.one_of(
            _ANY,
            st.dictionaries(
                st.one_of(st.just("chat"), st.text(max_size=5), st.integers(0, 9)),
                _POOL,
                max_size=3,
            ),
        ),
        "timeouts": st.one_of(_ANY, _optional({"connect": _ANY, "handshake": _ANY, "close": _ANY})),
        "limits": st.one_of(_ANY, _optional({"max_header_bytes": _ANY, "buffer_bytes": _ANY})),
        "shutdown": st.one_of(_ANY, _optional({"deadline": _ANY})),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_CONFIG_SHAPED)
@example(
    tree={
        "listeners": [{"address": "127.0.0.1:0", "pool": "chat"}],
        "pools": {7: {"backends": ["127.0.0.1:1"]}},
    }
)
def test_parse_config_raises_only_config_error_on_config_shaped_input(tree: dict) -> None:  # type: ignore[type-arg]
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        result = parse_config(text, source="fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        return
    assert isinstance(result, Config)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.from_regex(r"\A-?\d{0,400}(\.\d{0,3})?(ms|s|m|h)?\Z"),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
@example(value=10**400)
@example(value=-(10**400))
@example(value="9" * 400 + "h")
def test_parse_duration_returns_positive_float_or_raises_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert isinstance(seconds, float)
    assert math.isfinite(seconds)
    assert seconds > 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("off", None), ("0", None), ("null", None), ("false", None), ("65536", 65536), ('"256KiB"', 262144)],
)
def test_splice_min_bytes_is_a_size_or_off(value: str, expected: int | None) -> None:
    config = parse_config(MINIMAL + f"limits: {{splice_min_bytes: {value}}}\n")
    assert config.limits.splice_min_bytes == expected


def test_splice_min_bytes_defaults_to_128_kib_and_rejects_nonsense_with_its_key() -> None:
    assert parse_config(MINIMAL).limits.splice_min_bytes == 131072
    problems = _problems(MINIMAL + "limits: {splice_min_bytes: lots}\n")
    assert "limits.splice_min_bytes" in problems

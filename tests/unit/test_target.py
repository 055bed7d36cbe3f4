"""Request-target normalisation (protocol/target.py): the table of forms, and its properties.

Routing and the backend see the same normalised target, so no spelling of a path can reach a
route other than the one the backend will act on.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.protocol.target import UNRESERVED, BadTarget, normalize_path, normalize_target

HOST = b"127.0.0.1:8080"


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/", b"/"),
        (b"/admin", b"/admin"),
        (b"/%61dmin", b"/admin"),
        (b"/%41%42%2d%2E%5f%7E", b"/AB-._~"),
        (b"//admin", b"/admin"),
        (b"/a///b//", b"/a/b/"),
        (b"/public/../admin", b"/admin"),
        (b"/./admin", b"/admin"),
        (b"/admin/../admin", b"/admin"),
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/a/b/..", b"/a/"),
        (b"/a/.", b"/a/"),
        (b"/a/..", b"/"),
        (b"/ADMIN", b"/ADMIN"),  # matching is case-sensitive: no folding
        (b"/a%20b%c3%a9", b"/a%20b%C3%A9"),  # other escapes kept, hex in upper case
        (b"/%25", b"/%25"),
        (b"/chat?token=a/../b&x=%2F", b"/chat?token=a/../b&x=%2F"),  # the query as is
        (b"/x/../admin?", b"/admin?"),
        (b"http://127.0.0.1:8080/admin", b"/admin"),
        (b"HTTP://127.0.0.1:8080//x/../admin?q=1", b"/admin?q=1"),
        (b"ws://127.0.0.1:8080", b"/"),
        (b"http://127.0.0.1:8080?q", b"/?q"),
    ],
)
def test_targets_normalise_to_what_the_backend_is_sent(target: bytes, normal: bytes) -> None:
    assert normalize_target(target, host=HOST) == normal


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (b"/admin%2Fx", "encoded /"),
        (b"/admin%2fx", "encoded /"),
        (b"/a%5Cb", "encoded \\"),
        (b"/a\\b", "\\"),
        (b"/a%00b", "NUL"),
        (b"/..", "above the root"),
        (b"/a/../..", "above the root"),
        (b"/%2e%2e/admin", "above the root"),
        (b"/a%zz", "malformed"),
        (b"/a%4", "malformed"),
        (b"/admin#x", "#"),
        (b"/admin?x#y", "#"),
        (b"*", "must be a path"),
        (b"127.0.0.1:8080", "must be a path"),
        (b"admin", "must be a path"),
        (b"ftp://127.0.0.1:8080/admin", "scheme"),
        (b"http://evil.example/admin", "not the Host"),
        (b"http://127.0.0.1/admin", "not the Host"),  # port 80 is not 8080
        (b"http://user:pw@127.0.0.1:8080/admin", "user information"),
    ],
)
def test_unsafe_targets_are_refused_with_a_reason(target: bytes, why: str) -> None:
    with pytest.raises(BadTarget, match=None) as caught:
        normalize_target(target, host=HOST)
    assert why in str(caught.value)


def test_absolute_form_authority_compares_without_case_and_with_default_ports() -> None:
    assert normalize_target(b"http://Example.COM/a", host=b"example.com:80") == b"/a"
    assert normalize_target(b"wss://example.com:443/a", host=b"EXAMPLE.com") == b"/a"
    assert normalize_target(b"http://[::1]:8080/a", host=b"[::1]:8080") == b"/a"
    with pytest.raises(BadTarget):
        normalize_target(b"http://[::1]:8080/a", host=b"[::2]:8080")


# --- properties ------------------------------------------------------------------------------

_SEGMENT_CHARS = st.sampled_from([*"aZ09-._~!$&'()*+,;=:@", "%2e", "%2F", "%41", "%7e", "%20", "%c3", "\\", "%", "#"])
_SEGMENT = st.one_of(
    st.sampled_from(["", ".", "..", "%2e", "%2E%2e", "."]),
    st.lists(_SEGMENT_CHARS, max_size=6).map("".join),
)
_PATH = st.lists(_SEGMENT, max_size=8).map(lambda segs: "/" + "/".join(segs))


def _normal_or_none(path: str) -> str | None:
    try:
        return normalize_path(path)
    except BadTarget:
        return None


@settings(max_examples=400)
@given(_PATH)
def test_normalised_paths_are_fixed_points_without_empty_or_dot_segments(path: str) -> None:
    normal = _normal_or_none(path)
    if normal is None:
        return
    assert normal.startswith("/")
    assert "//" not in normal
    segments = normal.split("/")[1:]
    assert not {".", ".."} & set(segments)
    assert "\\" not in normal and "#" not in normal
    for i in range(len(normal)):  # every escape left is of a character that must stay escaped
        if normal[i] == "%":
            assert chr(int(normal[i + 1 : i + 3], 16)) not in UNRESERVED
            assert normal[i + 1 : i + 3].isupper() or normal[i + 1 : i + 3].isdigit()
    assert normalize_path(normal) == normal  # idempotent


_NORMAL_SEGMENT = st.text(alphabet="abcXYZ019-_~!$&'()*+,;=:@", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
) | st.sampled_from(["%20", "a%C3%A9", "%25", ".x", "..y"])


@settings(max_examples=300)
@given(st.lists(_NORMAL_SEGMENT, max_size=6), st.booleans())
def test_a_path_already_normal_is_never_changed(segments: list[str], trailing: bool) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    assert normalize_path(path) == path

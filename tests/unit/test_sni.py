"""policy/sni.py: which certificate answers a ClientHello's server name."""

from __future__ import annotations

import pytest

from wsproxy.policy.sni import choose_certificate

NAMES = [["app.example.com"], ["*.example.com", "example.com"], ["api.example.com"], ["*.b.example.com"]]


@pytest.mark.parametrize(
    ("server_name", "index"),
    [
        ("app.example.com", 0),  # exact
        ("API.example.com.", 2),  # exact beats the earlier wildcard; case and a final dot ignored
        ("chat.example.com", 1),  # wildcard, one label
        ("example.com", 1),  # exact on the second certificate
        ("x.b.example.com", 3),  # the deeper wildcard
        ("a.x.example.com", 0),  # a wildcard covers one label only: nothing matches, the first
        ("other.org", 0),
        (None, 0),  # no SNI
        ("", 0),
    ],
)
def test_exact_then_wildcard_then_the_first(server_name: str | None, index: int) -> None:
    assert choose_certificate(server_name, NAMES) == index

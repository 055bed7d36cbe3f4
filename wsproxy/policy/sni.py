"""Which of a listener's certificates answers a TLS ClientHello: a pure function of the name the
client sent (SNI) and the names each certificate covers.

An exact name wins over a wildcard, a wildcard covers exactly one label (`*.example.com` covers
`a.example.com`, not `example.com` nor `a.b.example.com`, as RFC 6125 clients check it), earlier
certificates win ties, and the first certificate answers when nothing matches or no SNI came.
"""

from __future__ import annotations

from collections.abc import Sequence


def choose_certificate(server_name: str | None, names: Sequence[Sequence[str]]) -> int:
    """The index into `names` (one list of DNS names per certificate) that serves `server_name`."""
    if not server_name:
        return 0
    wanted = server_name.strip().lower().rstrip(".")
    for i, covered in enumerate(names):
        if any(n.lower() == wanted for n in covered):
            return i
    head, dot, rest = wanted.partition(".")
    if head and dot and rest:
        for i, covered in enumerate(names):
            if any(n.lower() == "*." + rest for n in covered):
                return i
    return 0

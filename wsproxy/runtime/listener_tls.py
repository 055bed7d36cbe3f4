"""Several certificates on one TLS listener, chosen by SNI.

listen.server_ssl_context builds one context per `{cert, key}` (TLS 1.2 minimum, ALPN http/1.1
only, errors naming the files); with more than one, the first context's SNI callback (here)
switches the connection to the certificate policy/sni.py picks from the names each certificate
covers (its DNS subjectAltNames, else its common name). Contexts are built when the listener
opens and again on every reload, so a renewed file applies to new connections while open
sessions keep the context they started with.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from wsproxy.policy.sni import choose_certificate


def certificate_names(cert: Path) -> list[str]:
    """The DNS names the first certificate in a PEM file covers."""
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def choose_by_sni(contexts: list[ssl.SSLContext], names: list[list[str]]) -> ssl.SSLContext:
    """The context a listener wraps new connections with: the first of `contexts`, whose SNI
    callback switches a connection to the one policy/sni.py picks by `names` (each context's)."""

    def pick(conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = contexts[choose_certificate(server_name, names)]

    contexts[0].sni_callback = pick
    return contexts[0]

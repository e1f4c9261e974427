"""``checkURI``: the peer's certificate must carry a matching URI subjectAltName.

A pytunnel extension beside stunnel's ``checkHost``/``checkIP``/``checkEmail`` (made for
SPIFFE IDs such as ``spiffe://example.org/ns/prod/sa/web``).  A pattern matches a URI SAN

* exactly (the scheme and the authority compared without regard to case, as RFC 3986 says
  they are; the path byte for byte), or
* with ``*`` standing for one whole, non-empty path segment: ``spiffe://example.org/ns/*/sa/web``
  matches ``.../ns/prod/sa/web`` but neither ``.../ns/sa/web`` nor ``.../ns/a/b/sa/web``.

A ``*`` anywhere else (inside a segment, in the authority) is refused when the configuration
is read (:func:`pattern_problem`), so a pattern never means more than it says.  Which checks
combine how is tunnel/verify.py's business (any one ``check*`` match accepts).

A leaf: imports nothing of tunnel; cryptography only where a certificate is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509


def _split(uri: str) -> tuple[str, str] | None:
    """(``scheme://authority`` lower-cased, the rest), or None when ``uri`` has no ``://``."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        return None
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority}".lower(), slash + path


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a checkURI value, or None when it can."""
    parts = _split(pattern)
    if parts is None:
        return f"{pattern!r} is not a URI (expected SCHEME://AUTHORITY/PATH, e.g. spiffe://example.org/ns/*/sa/web)"
    head, path = parts
    if "*" in head:
        return f"{pattern!r}: '*' may stand only for a whole path segment, not in the scheme or authority"
    if any("*" in seg and seg != "*" for seg in path.split("/")):
        return f"{pattern!r}: '*' must be a whole path segment (like /ns/*/sa), not part of one"
    return None


def matches(pattern: str, uri: str) -> bool:
    """Does the URI SAN ``uri`` match ``pattern`` (exact, or ``*`` for one path segment)?"""
    want, got = _split(pattern), _split(uri)
    if want is None or got is None or want[0] != got[0]:
        return False
    if "*" not in want[1]:
        return want[1] == got[1]
    wsegs, gsegs = want[1].split("/"), got[1].split("/")
    if len(wsegs) != len(gsegs):
        return False
    return all(w == g or (w == "*" and g != "") for w, g in zip(wsegs, gsegs, strict=True))


def cert_uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def match_uri(cert: x509.Certificate, pattern: str) -> bool:
    return any(matches(pattern, uri) for uri in cert_uris(cert))

"""``alpn = PROTO[,PROTO...]``: Application-Layer Protocol Negotiation per service (RFC 7301).

A pytunnel extension (stunnel 5.68 has no ALPN option).

* **Client mode** offers the list in its order (``SSLContext.set_alpn_protocols``) and, after
  the handshake, logs ``ALPN: negotiated NAME`` (or ``ALPN: none negotiated``).
* **Server mode** selects the first protocol of *its own* list that the client offers.  A
  client offering ALPN with no protocol in common gets the ``no_application_protocol`` alert
  (RFC 7301 section 3.2) and the connection ends with one line; a client offering no ALPN
  at all is served.  Python's ssl module cannot do that: its server callback silently carries
  on without ALPN when nothing matches.  So the selection is OpenSSL's
  ``SSL_CTX_set_alpn_select_cb`` reached through ctypes on the context's ``SSL_CTX``
  (checked by :func:`tunnel.ossl.handle`), returning ``SSL_TLSEXT_ERR_ALERT_FATAL``.

The negotiated name reaches the PROXY v2 header (``PP2_TYPE_ALPN``, tunnel/protocols/proxy.py)
and the JSON close line (``alpn``) through :func:`negotiated`.

Imports ossl and reasons (leaves).
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable
from typing import Any

from tunnel import ossl
from tunnel.reasons import HandshakeFailure

ACME_TLS = "acme-tls/1"  # RFC 8737: an ACME server validating tls-alpn-01 (tunnel/acmeserve.py)
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2
SSL_TLSEXT_ERR_NOACK = 3

# int cb(SSL *s, const unsigned char **out, unsigned char *outlen,
#        const unsigned char *in, unsigned int inlen, void *arg)
_SELECT_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
)
# a server's first say: (SSL *, the offered list) -> offset of its choice, or None (tunnel/acmealpn.py)
Hook = Callable[[int, bytes], "int | None"]
_KEEP: dict[int, Any] = {}  # callbacks outlive their contexts: keyed by SSL_CTX pointer
_SET_CB: Any = None


def parse(text: str) -> list[str]:
    """The protocols of an ``alpn`` line; ValueError saying what is wrong."""
    names = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"{text!r}: expected PROTO[,PROTO...] (e.g. h2,http/1.1), no empty names")
    for name in names:
        raw = name.encode("ascii", "replace")
        if len(raw) > 255:
            raise ValueError(f"{name[:20]!r}...: a protocol name is at most 255 bytes")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r}: a protocol is listed twice")
    if ACME_TLS in names:  # only the ACME answer may choose it: the opening closes such handshakes
        raise ValueError(f"{ACME_TLS} is reserved for ACME's tls-alpn-01 validation (RFC 8737)")
    return names


def _wire_list(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, name) of each entry of a wire-format protocol list (length-prefixed)."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        n = data[i]
        if n == 0 or i + 1 + n > len(data):
            break
        out.append((i + 1, data[i + 1 : i + 1 + n]))
        i += 1 + n
    return out


def select(ours: list[bytes], offered: bytes) -> int | None:
    """Offset in ``offered`` (wire format) of the first of ``ours`` the client offers."""
    entries = _wire_list(offered)
    for want in ours:
        for offset, name in entries:
            if name == want:
                return offset
    return None


def _set_select_cb() -> Any:
    global _SET_CB
    if _SET_CB is None:
        try:
            lib = ossl.library()
            fn = lib.SSL_CTX_set_alpn_select_cb
        except (OSError, AttributeError) as exc:
            raise ossl.Unavailable(f"SSL_CTX_set_alpn_select_cb cannot be reached ({exc})") from None
        fn.argtypes = [ctypes.c_void_p, _SELECT_CB, ctypes.c_void_p]
        fn.restype = None
        _SET_CB = fn
    return _SET_CB


def configure(ctx: ssl.SSLContext, text: str | None, server: bool, hook: Hook | None = None) -> None:
    """Set a service's ALPN list on its context (``text`` None: no list; only with a ``hook``,
    which a server asks first).  Raises ValueError or ossl.Unavailable."""
    names = parse(text) if text is not None else []
    if not server:
        ctx.set_alpn_protocols(names)
        return
    ours = [n.encode() for n in names]
    ptr = ossl.handle(ctx)

    def callback(ssl_ptr: int, out: Any, outlen: Any, data: int, length: int, _arg: int) -> int:
        try:
            offered = ctypes.string_at(data, length)
            at = hook(ssl_ptr, offered) if hook is not None else None
            if at is None and not ours:
                return SSL_TLSEXT_ERR_NOACK  # no list of our own: carry on without ALPN
            if at is None:
                at = select(ours, offered)
            if at is None:
                return SSL_TLSEXT_ERR_ALERT_FATAL  # OpenSSL sends no_application_protocol
            out[0] = data + at
            outlen[0] = offered[at - 1]
            return SSL_TLSEXT_ERR_OK
        except BaseException:  # noqa: BLE001 - never unwind through OpenSSL: refuse instead
            return SSL_TLSEXT_ERR_ALERT_FATAL

    c_callback = _SELECT_CB(callback)
    _KEEP[ptr] = c_callback
    _set_select_cb()(ptr, c_callback, None)


def negotiated(sslobj: ssl.SSLObject | None) -> str | None:
    """The protocol ALPN chose on a finished handshake, or None."""
    if sslobj is None:
        return None
    try:
        return sslobj.selected_alpn_protocol()
    except (ValueError, ssl.SSLError):
        return None


def refused(exc: BaseException) -> HandshakeFailure | None:
    """NO_APPLICATION_PROTOCOL when a handshake failed for want of a common protocol."""
    # ours as the server (NO_APPLICATION_PROTOCOL), or the server's alert to our client
    text = f"{getattr(exc, 'reason', None) or ''} {exc}".lower().replace("_", " ")
    if isinstance(exc, ssl.SSLError) and "no application protocol" in text:
        return HandshakeFailure.NO_APPLICATION_PROTOCOL
    return None


def log_line(name: str | None) -> str:
    return f"ALPN: negotiated {name}" if name else "ALPN: none negotiated"

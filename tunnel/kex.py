"""Key exchange groups: post-quantum by default under ``pytunnel run``, and the group each
handshake used (``TLS group: NAME`` at debug 6, ``pytunnel_tls_handshakes_total{group}``).

* **Defaults.**  ``pytunnel CONFIG`` sets stunnel's own list (``X25519:P-256:X448:P-521:P-384``)
  when no ``curves`` line is written: drop-in behaviour.  ``pytunnel run`` leaves OpenSSL's
  default groups alone: OpenSSL 3.5 and newer then offers and prefers the hybrid
  ``X25519MLKEM768`` (ML-KEM-768 with X25519, draft-ietf-tls-ecdhe-mlkem), older ones their
  classic list.  :func:`keep_openssl_default` decides; tunnel/tls.py applies it.
* **Names.**  ``curves = X25519MLKEM768:X25519`` is passed to ``SSL_CTX_set1_groups_list``,
  which knows the hybrids on OpenSSL >= 3.5; on an older OpenSSL :func:`unknown_group_hint`
  says why the line is refused.
* **The negotiated group.**  Python's ssl module cannot say which group a handshake used.
  ``SSL_get0_group_name`` (OpenSSL >= 3.2) or ``SSL_group_to_name(SSL_get_negotiated_group)``
  (3.0) can, given the connection's ``SSL *``, which CPython keeps right after the weak
  reference to its socket in ``PySSLSocket``; :func:`_ssl_pointer` checks the layout against
  the context pointer next to it before trusting it, and gives up (None) otherwise.

Imports metrics (a leaf), nothing else of tunnel.
"""

from __future__ import annotations

import ctypes
import ssl
from typing import Any

from tunnel import ossl
from tunnel.metrics import STATS

SSL_CTRL_GET_NEGOTIATED_GROUP = 134
_PTR = ctypes.sizeof(ctypes.c_void_p)


def keep_openssl_default(curves_written: bool, secure: bool) -> bool:
    """No ``curves`` line under ``pytunnel run``: OpenSSL's own default groups."""
    return secure and not curves_written


def unknown_group_hint(curves: str) -> str:
    """The error for a ``curves`` list this OpenSSL refuses."""
    text = f"unknown group in {curves!r} (OpenSSL {ssl.OPENSSL_VERSION.split()[1]})"
    if "MLKEM" in curves.upper() and ssl.OPENSSL_VERSION_INFO < (3, 5):
        text += ": the ML-KEM hybrid groups need OpenSSL 3.5 or newer"
    return text


class _Lib:
    def __init__(self) -> None:
        lib = ossl.library()
        self.get_ctx = lib.SSL_get_SSL_CTX
        self.get_ctx.argtypes = [ctypes.c_void_p]
        self.get_ctx.restype = ctypes.c_void_p
        self.group_name: Any = getattr(lib, "SSL_get0_group_name", None)
        if self.group_name is not None:
            self.group_name.argtypes = [ctypes.c_void_p]
            self.group_name.restype = ctypes.c_char_p
        self.ctrl = lib.SSL_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.to_name = lib.SSL_group_to_name
        self.to_name.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.to_name.restype = ctypes.c_char_p


_LIB: _Lib | None = None
_BROKEN = False  # this Python's layout or library cannot be reached: stop trying
_CHECKED = False  # the layout was found to be CPython's


def _ssl_pointer(sslobj: ssl.SSLObject) -> int | None:
    """The connection's ``SSL *``, or None when CPython's layout is not the expected one."""
    global _CHECKED
    inner = getattr(sslobj, "_sslobj", None)
    if inner is None:
        return None
    base = id(inner) + object.__basicsize__
    if _CHECKED:  # the layout is the interpreter's: checked once, on the first connection
        return ctypes.c_void_p.from_address(base + _PTR).value or None
    ctx_obj = ctypes.c_void_p.from_address(base + 2 * _PTR).value  # PySSLSocket.ctx
    if ctx_obj != id(inner.context):
        return None
    ptr = ctypes.c_void_p.from_address(base + _PTR).value  # PySSLSocket.ssl
    ctx_ssl = ctypes.c_void_p.from_address(id(inner.context) + object.__basicsize__).value
    if not ptr or _lib().get_ctx(ptr) != ctx_ssl:
        return None
    _CHECKED = True
    return int(ptr)


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def negotiated_group(sslobj: ssl.SSLObject) -> str | None:
    """The key exchange group of a finished handshake (``X25519MLKEM768``, ``x25519``, ...),
    or None where OpenSSL cannot say (or this Python cannot be reached that way)."""
    global _BROKEN
    if _BROKEN:
        return None
    try:
        ptr = _ssl_pointer(sslobj)
        if ptr is None:
            _BROKEN = True
            return None
        lib = _lib()
        if lib.group_name is not None:
            name = lib.group_name(ptr)
        else:
            nid = lib.ctrl(ptr, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
            name = lib.to_name(ptr, nid) if nid > 0 else None
    except (OSError, AttributeError, ValueError):
        _BROKEN = True
        return None
    return name.decode("ascii", "replace") if name else None


def observe(sslobj: ssl.SSLObject, service: str) -> str | None:
    """Count a completed handshake under its group (``unknown`` where OpenSSL cannot say);
    the group's name for the ``TLS group:`` line."""
    group = negotiated_group(sslobj)
    STATS.count("pytunnel_tls_handshakes", service, group or "unknown")
    return group

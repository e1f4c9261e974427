"""OpenSSL calls on one connection's ``SSL *`` where Python's ``ssl`` module has no API.

tunnel/ossl.py reaches a context's ``SSL_CTX *``; this module reaches the ``SSL *`` of an
:class:`ssl.SSLObject` for the two things stunnel does per connection that Python cannot:

* :func:`adopt_verification`: after an SNI switch (``SSLObject.context = secondary``, which
  is OpenSSL's ``SSL_set_SSL_CTX``) take over the secondary context's verify mode, verify
  callback, depth and verification flags (CRL checks, partial chains).  ``SSL_set_SSL_CTX``
  swaps only the certificate, the key and the trust store; stunnel sets the rest in its
  servername callback, so does this.
* :func:`verify_result`: what OpenSSL's verification of the peer's chain found, kept in the
  session (and so in a resumed one: ``redirect`` redirects a resumed session whose peer was
  not authenticated when it was made, as stunnel does).

The ``SSL *`` is the second field after the object header of CPython's ``PySSLSocket``
(``Socket``, ``ssl``, ``ctx``: unchanged from Python 3.7 to 3.14).  Before any call,
:func:`ssl_of` checks it twice: the third field must be the very ``SSLContext`` object the
``SSLObject`` reports, and OpenSSL must say that this ``SSL *`` belongs to that context's
``SSL_CTX *`` (itself checked by :func:`tunnel.ossl.handle`).  Otherwise
:class:`~tunnel.ossl.Unavailable` is raised, never a guess.

Imports ossl (a leaf) and nothing else of tunnel.
"""

from __future__ import annotations

import ctypes
import ssl
from typing import Any

from tunnel import ossl

X509_V_OK = 0


class _SslLib:
    """The SSL-level prototypes, next to the SSL_CTX ones of tunnel.ossl."""

    def __init__(self) -> None:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        try:
            lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
            self.get_ssl_ctx = lib.SSL_get_SSL_CTX
            self.set_verify = lib.SSL_set_verify
            self.ctx_verify_callback = lib.SSL_CTX_get_verify_callback
            self.ctx_verify_mode = lib.SSL_CTX_get_verify_mode
            self.ctx_verify_depth = lib.SSL_CTX_get_verify_depth
            self.set_verify_depth = lib.SSL_set_verify_depth
            self.ctx_param = lib.SSL_CTX_get0_param
            self.ssl_param = lib.SSL_get0_param
            self.param_flags = lib.X509_VERIFY_PARAM_get_flags
            self.param_clear = lib.X509_VERIFY_PARAM_clear_flags
            self.param_set = lib.X509_VERIFY_PARAM_set_flags
            self.verify_result = lib.SSL_get_verify_result
        except (OSError, AttributeError) as exc:
            raise ossl.Unavailable(
                f"cannot reach the OpenSSL library of Python's ssl module ({exc})"
            ) from None
        vp = ctypes.c_void_p
        protos: tuple[tuple[Any, list[Any], Any], ...] = (
            (self.get_ssl_ctx, [vp], vp),
            (self.set_verify, [vp, ctypes.c_int, vp], None),
            (self.ctx_verify_callback, [vp], vp),
            (self.ctx_verify_mode, [vp], ctypes.c_int),
            (self.ctx_verify_depth, [vp], ctypes.c_int),
            (self.set_verify_depth, [vp, ctypes.c_int], None),
            (self.ctx_param, [vp], vp),
            (self.ssl_param, [vp], vp),
            (self.param_flags, [vp], ctypes.c_ulong),
            (self.param_clear, [vp, ctypes.c_ulong], ctypes.c_int),
            (self.param_set, [vp, ctypes.c_ulong], ctypes.c_int),
            (self.verify_result, [vp], ctypes.c_long),
        )
        for fn, args, res in protos:
            fn.argtypes = args
            fn.restype = res


_LIB: _SslLib | None = None


def _lib() -> _SslLib:
    global _LIB
    if _LIB is None:
        _LIB = _SslLib()
    return _LIB


def ssl_of(sslobj: object) -> int:
    """The ``SSL *`` of an :class:`ssl.SSLObject`, checked against its context."""
    inner = getattr(sslobj, "_sslobj", None)
    context = getattr(sslobj, "context", None)
    if inner is None or not isinstance(context, ssl.SSLContext):
        raise ossl.Unavailable("not an ssl.SSLObject")
    fields = (ctypes.c_void_p * 3).from_address(id(inner) + object.__basicsize__)
    ssl_ptr, ctx_obj = fields[1], fields[2]
    if not ssl_ptr or ctx_obj != id(context):
        raise ossl.Unavailable("this Python's SSLObject layout is not CPython's")
    if _lib().get_ssl_ctx(ssl_ptr) != ossl.handle(context):
        raise ossl.Unavailable("this Python's SSLObject layout is not CPython's")
    return int(ssl_ptr)


def check_layout(context: ssl.SSLContext) -> None:
    """Raise :class:`~tunnel.ossl.Unavailable` unless :func:`ssl_of` works with this Python
    (tried on a throwaway object of ``context``, at configuration time)."""
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    ssl_of(probe)


def adopt_verification(sslobj: object) -> None:
    """After ``sslobj.context = secondary``: the secondary's verify mode, callback, depth
    and verification flags on this connection, as stunnel's servername callback sets them."""
    lib = _lib()
    ssl_ptr = ssl_of(sslobj)
    ctx_ptr = lib.get_ssl_ctx(ssl_ptr)
    lib.set_verify(ssl_ptr, lib.ctx_verify_mode(ctx_ptr), lib.ctx_verify_callback(ctx_ptr))
    lib.set_verify_depth(ssl_ptr, lib.ctx_verify_depth(ctx_ptr))
    mine, theirs = lib.ssl_param(ssl_ptr), lib.ctx_param(ctx_ptr)
    if mine and theirs:
        lib.param_clear(mine, lib.param_flags(mine))
        lib.param_set(mine, lib.param_flags(theirs))


def verify_result(sslobj: object) -> int:
    """``SSL_get_verify_result``: X509_V_OK (0) when the peer's chain verified (or none was
    sent); for a resumed session, the result of the handshake that made it."""
    return int(_lib().verify_result(ssl_of(sslobj)))

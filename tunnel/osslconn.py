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
* OCSP stapling (tunnel/stapling.py): :func:`request_status` asks for a staple before a
  client's handshake, :func:`stapled` reads it after; :func:`serve_status` installs a
  server context's status callback, which hands OpenSSL a copy of the cached response in
  an ``OPENSSL_malloc`` buffer (OpenSSL frees it) and never blocks.  Most of these are
  macros over ``SSL_ctrl``/``SSL_CTX_callback_ctrl``; the numbers are OpenSSL's (ssl.h,
  tls1.h), unchanged since 1.0.

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
import weakref
from collections.abc import Callable
from typing import Any

from tunnel import ossl

X509_V_OK = 0
SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE = 65
SSL_CTRL_GET_TLSEXT_STATUS_REQ_OCSP_RESP = 70
SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
TLSEXT_STATUSTYPE_OCSP = 1
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_NOACK = 3
_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# a server context's status callback lives exactly as long as the context
_STATUS_KEEP: weakref.WeakKeyDictionary[ssl.SSLContext, Any] = weakref.WeakKeyDictionary()


class _SslLib:
    """The SSL-level prototypes, next to the SSL_CTX ones of tunnel.ossl."""

    def __init__(self) -> None:
        try:
            lib = ossl.library()
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
            self.ssl_ctrl = lib.SSL_ctrl
            self.ctx_callback_ctrl = lib.SSL_CTX_callback_ctrl
            self.malloc = lib.CRYPTO_malloc
            self.free = lib.CRYPTO_free
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
            (self.ssl_ctrl, [vp, ctypes.c_int, ctypes.c_long, vp], ctypes.c_long),
            (self.ctx_callback_ctrl, [vp, ctypes.c_int, vp], ctypes.c_long),
            (self.malloc, [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int], vp),
            (self.free, [vp, ctypes.c_char_p, ctypes.c_int], None),
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


def request_status(sslobj: object) -> None:
    """``SSL_set_tlsext_status_type(ssl, TLSEXT_STATUSTYPE_ocsp)`` before a client's
    handshake: the ClientHello asks for a stapled OCSP response (status_request)."""
    if (
        _lib().ssl_ctrl(ssl_of(sslobj), SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE, TLSEXT_STATUSTYPE_OCSP, None)
        != 1
    ):
        raise ossl.Unavailable("OpenSSL refused SSL_set_tlsext_status_type")


def stapled(sslobj: object) -> bytes:
    """``SSL_get_tlsext_status_ocsp_resp`` after the handshake: the DER OCSP response the
    server stapled, or ``b""`` when it sent none."""
    resp = ctypes.c_void_p()
    size = int(
        _lib().ssl_ctrl(ssl_of(sslobj), SSL_CTRL_GET_TLSEXT_STATUS_REQ_OCSP_RESP, 0, ctypes.byref(resp))
    )
    if size <= 0 or not resp.value:
        return b""
    return ctypes.string_at(resp.value, size)


def client_staple(sslobj: ssl.SSLObject, say: Callable[[int, str], None]) -> bytes | None:
    """After the handshake of a client that asked (:func:`request_status`): the staple, with
    stunnel 5.71+'s lines; None without one, and on resumption (nothing is checked then)."""
    if sslobj.session_reused:
        say(7, "OCSP: Skipped OCSP stapling (previous session reused)")
        return None
    try:
        staple = stapled(sslobj)
    except ossl.Unavailable:
        return None
    if staple:
        say(6, "OCSP: OCSP stapling response received")
    else:  # LOG3 as stunnel; the configured and AIA responders are asked next
        say(3, "OCSP: No OCSP stapling response received")
    return staple or None


def serve_status(context: ssl.SSLContext, current: Callable[[], bytes | None]) -> None:
    """``SSL_CTX_set_tlsext_status_cb`` on a server context: a client asking for a staple
    gets a copy of ``current()`` (the cached DER response; None: nothing to staple, the
    extension is not acknowledged).  ``current`` must not block: it runs inside the
    handshake.  The callback is kept alive as long as ``context``."""
    lib = _lib()
    ctx_ptr = ossl.handle(context)

    def callback(ssl_ptr: int | None, _arg: int | None) -> int:
        try:
            der = current()
            if not der or not ssl_ptr:
                return SSL_TLSEXT_ERR_NOACK
            buf = lib.malloc(len(der), b"pytunnel", 0)  # OpenSSL frees it with the SSL
            if not buf:
                return SSL_TLSEXT_ERR_NOACK
            ctypes.memmove(buf, der, len(der))
            if lib.ssl_ctrl(ssl_ptr, SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(der), buf) != 1:
                lib.free(buf, b"pytunnel", 0)
                return SSL_TLSEXT_ERR_NOACK
            return SSL_TLSEXT_ERR_OK
        except BaseException:  # noqa: BLE001 - never unwind through OpenSSL: no staple instead
            return SSL_TLSEXT_ERR_NOACK

    c_callback = _STATUS_CB(callback)
    _STATUS_KEEP[context] = c_callback
    fp = ctypes.cast(c_callback, ctypes.c_void_p)
    if lib.ctx_callback_ctrl(ctx_ptr, SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, fp) != 1:
        raise ossl.Unavailable("OpenSSL refused SSL_CTX_set_tlsext_status_cb")

"""OpenSSL calls on a Python ``SSLContext`` where the ``ssl`` module has no API.

stunnel sets a few things on its ``SSL_CTX`` that Python never exposes: a verify callback
(``redirect`` needs a handshake to *succeed* when the client certificate fails, and to be
told why), the server session cache size, timeout and mode (``sessionCacheSize``,
``sessionCacheTimeout``, ``sessionResume = no``) and fixed session ticket keys
(``ticketKeySecret``/``ticketMacSecret``).  This module reaches the context's ``SSL_CTX``
through ctypes and calls the same libssl the ``_ssl`` module is linked with.

The ``SSL_CTX *`` is the first field after the object header of CPython's ``PySSLContext``
(unchanged from Python 2.7 to 3.14).  Before any call, :func:`handle` checks that pointer
against two values the ``ssl`` module reports itself (the options and the verify mode);
if they disagree the option is refused with a reason instead of guessing.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable
from typing import Any

SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_CHAIN_CERT = 88
SSL_CONF_FLAG_FILE = 0x2
SSL_CONF_FLAG_CLIENT = 0x4
SSL_CONF_FLAG_SERVER = 0x8
SSL_CONF_FLAG_CERTIFICATE = 0x20
SSL_SESS_CACHE_OFF = 0x0000
SSL_SESS_CACHE_SERVER = 0x0002
SSL_SENT_SHUTDOWN = 1

VerifyCallback = Callable[[int, int], int]
_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class Unavailable(Exception):
    """This Python's ssl module cannot be reached this way; the message says why."""


def library() -> ctypes.CDLL:
    """libssl/libcrypto as Python's ``_ssl`` module loaded them (this process's symbols where
    ``_ssl`` is built in).  Raises OSError."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    return ctypes.CDLL(path) if path else ctypes.CDLL(None)


class _Lib:
    """libssl/libcrypto as loaded by the ``_ssl`` module, with the prototypes we use."""

    def __init__(self) -> None:
        try:
            lib = library()
            self.raw = lib
            self.get_options = lib.SSL_CTX_get_options
            self.get_verify_mode = lib.SSL_CTX_get_verify_mode
            self.set_verify = lib.SSL_CTX_set_verify
            self.ctrl = lib.SSL_CTX_ctrl
            self.set_timeout = lib.SSL_CTX_set_timeout
            self.store_error = lib.X509_STORE_CTX_get_error
            self.store_depth = lib.X509_STORE_CTX_get_error_depth
            self.error_string = lib.X509_verify_cert_error_string
            self.store_cert = lib.X509_STORE_CTX_get_current_cert
            self.i2d_x509 = lib.i2d_X509
            self.set_ciphersuites = lib.SSL_CTX_set_ciphersuites
            self.conf_new = lib.SSL_CONF_CTX_new
            self.load_store = lib.SSL_CTX_load_verify_store
            self.conf_flags = lib.SSL_CONF_CTX_set_flags
            self.conf_ctx = lib.SSL_CONF_CTX_set_ssl_ctx
            self.conf_cmd = lib.SSL_CONF_cmd
            self.conf_finish = lib.SSL_CONF_CTX_finish
            self.conf_free = lib.SSL_CONF_CTX_free
            self.load_client_ca = lib.SSL_load_client_CA_file
            self.add_dir_subjects = lib.SSL_add_dir_cert_subjects_to_stack
            self.set_client_ca = lib.SSL_CTX_set_client_CA_list
            self.name_stack_new = lib.OPENSSL_sk_new_null
            self._sessions(lib)
        except (OSError, AttributeError) as exc:
            raise Unavailable(f"cannot reach the OpenSSL library of Python's ssl module ({exc})") from None
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.get_verify_mode.argtypes = [ctypes.c_void_p]
        self.get_verify_mode.restype = ctypes.c_int
        self.set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CB]
        self.set_verify.restype = None
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
        self.set_timeout.restype = ctypes.c_long
        self.store_error.argtypes = [ctypes.c_void_p]
        self.store_error.restype = ctypes.c_int
        self.store_depth.argtypes = [ctypes.c_void_p]
        self.store_depth.restype = ctypes.c_int
        self.error_string.argtypes = [ctypes.c_long]
        self.error_string.restype = ctypes.c_char_p
        self.store_cert.argtypes = [ctypes.c_void_p]
        self.store_cert.restype = ctypes.c_void_p
        self.i2d_x509.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        self.i2d_x509.restype = ctypes.c_int
        self.set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.set_ciphersuites.restype = ctypes.c_int
        self.load_store.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.load_store.restype = ctypes.c_int
        self.conf_new.argtypes = []
        self.conf_new.restype = ctypes.c_void_p
        self.conf_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.conf_flags.restype = ctypes.c_uint
        self.conf_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.conf_ctx.restype = None
        self.conf_cmd.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        self.conf_cmd.restype = ctypes.c_int
        self.conf_finish.argtypes = [ctypes.c_void_p]
        self.conf_finish.restype = ctypes.c_int
        self.conf_free.argtypes = [ctypes.c_void_p]
        self.conf_free.restype = None
        self.load_client_ca.argtypes = [ctypes.c_char_p]
        self.load_client_ca.restype = ctypes.c_void_p
        self.add_dir_subjects.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.add_dir_subjects.restype = ctypes.c_int
        self.set_client_ca.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.set_client_ca.restype = None
        self.name_stack_new.argtypes = []
        self.name_stack_new.restype = ctypes.c_void_p

    def _sessions(self, lib: ctypes.CDLL) -> None:
        """What :func:`set_session` and :func:`keep_session` call."""
        self.ssl_get_ctx = lib.SSL_get_SSL_CTX
        self.ssl_is_server = lib.SSL_is_server
        self.ssl_set_session = lib.SSL_set_session
        self.session_get_id = lib.SSL_SESSION_get_id
        self.ssl_get_shutdown = lib.SSL_get_shutdown
        self.ssl_set_shutdown = lib.SSL_set_shutdown
        self.ssl_get_ctx.argtypes = [ctypes.c_void_p]
        self.ssl_get_ctx.restype = ctypes.c_void_p
        self.ssl_is_server.argtypes = [ctypes.c_void_p]
        self.ssl_is_server.restype = ctypes.c_int
        self.ssl_set_session.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.ssl_set_session.restype = ctypes.c_int
        self.session_get_id.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        self.session_get_id.restype = ctypes.c_void_p
        self.ssl_get_shutdown.argtypes = [ctypes.c_void_p]
        self.ssl_get_shutdown.restype = ctypes.c_int
        self.ssl_set_shutdown.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.ssl_set_shutdown.restype = None


_LIB: _Lib | None = None
# callbacks must outlive their contexts: kept here, keyed by the SSL_CTX they are set on
_KEEP: dict[int, Any] = {}


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def handle(ctx: ssl.SSLContext) -> int:
    """The context's ``SSL_CTX *``, checked against what the ssl module reports."""
    lib = _lib()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise Unavailable("this Python's SSLContext layout is not CPython's")
    expected = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: SSL_VERIFY_PEER}.get(
        ctx.verify_mode, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    )
    if lib.get_options(ptr) != int(ctx.options) or lib.get_verify_mode(ptr) & 0x3 != expected:
        raise Unavailable("this Python's SSLContext layout is not CPython's")
    return ptr


_HEAD = object.__basicsize__  # PyObject_HEAD: the first field of a C object follows it
_PTR = ctypes.sizeof(ctypes.c_void_p)
_SESSION_LAYOUT: bool | None = None  # None: not checked yet; then whether it is CPython's


def _field(obj: object, index: int) -> int:
    """The ``index``-th pointer field after the object header of a C object."""
    return ctypes.c_void_p.from_address(id(obj) + _HEAD + index * _PTR).value or 0


def set_session(sslobj: ssl.SSLObject, session: ssl.SSLSession) -> bool:
    """``SSL_set_session`` on a client ``SSLObject`` before its handshake, sharing the cached
    ``SSL_SESSION`` as stunnel does.  CPython's ``session`` setter copies the session through
    DER instead (``i2d``/``d2i``, re-parsing the peer's certificate chain: 0.2 ms a connection).

    CPython lays out ``_ssl._SSLSocket`` as (header, socket weakref, ``SSL *``, ...) and
    ``SSLSession`` as (header, ``SSL_SESSION *``, ``PySSLContext *``).  Both are checked before
    any call: the session's context must be this object's context (what the setter demands
    too), its id what the ssl module reports, and the ``SSL *`` must belong to the context's
    ``SSL_CTX`` on the client side.  False (the caller falls back to the setter) when any
    check fails or the library cannot be reached."""
    global _SESSION_LAYOUT
    if _SESSION_LAYOUT is False:
        return False
    try:
        lib = _lib()
        ctx = sslobj.context
        inner = sslobj._sslobj  # type: ignore[attr-defined]  # the _ssl._SSLSocket
        ssl_ptr, sess_ptr = _field(inner, 1), _field(session, 0)
        ok = bool(ssl_ptr and sess_ptr) and _field(session, 1) == id(ctx)
        if ok and _SESSION_LAYOUT is None:
            size = ctypes.c_uint(0)
            raw = lib.session_get_id(sess_ptr, ctypes.byref(size))
            ok = ctypes.string_at(raw, size.value) == session.id if raw else False
            ok = ok and lib.ssl_get_ctx(ssl_ptr) == handle(ctx) and lib.ssl_is_server(ssl_ptr) == 0
            _SESSION_LAYOUT = ok
    except (Unavailable, AttributeError, OSError):
        _SESSION_LAYOUT = False
        return False
    return ok and lib.ssl_set_session(ssl_ptr, sess_ptr) == 1


def keep_session(sslobj: ssl.SSLObject) -> None:
    """Before a client ``SSLObject`` is freed: keep its session resumable, as stunnel does
    (``SSL_set_shutdown`` before ``SSL_free``).  OpenSSL marks the session of an ``SSL`` freed
    after its handshake without a close_notify sent as not resumable; with sessions shared by
    :func:`set_session` that would spoil the cached one (CPython's setter hides this: its DER
    copy drops the mark).  Does nothing where :func:`set_session` cannot work."""
    if _SESSION_LAYOUT is False:
        return
    try:
        lib = _lib()
        ssl_ptr = _field(sslobj._sslobj, 1)  # type: ignore[attr-defined]
        if not ssl_ptr or (not _SESSION_LAYOUT and lib.ssl_get_ctx(ssl_ptr) != handle(sslobj.context)):
            return
    except (Unavailable, AttributeError, OSError):
        return
    lib.ssl_set_shutdown(ssl_ptr, lib.ssl_get_shutdown(ssl_ptr) | SSL_SENT_SHUTDOWN)


def verify_errors(
    ctx: ssl.SSLContext, on_error: Callable[[str, int, bytes], None], let_pass: bool = True
) -> bool:
    """Tell ``on_error(reason, depth, der)`` of each certificate that fails verification.

    OpenSSL still verifies; each failure is passed to ``on_error`` with the DER of the
    certificate at that depth (stunnel's "CERT: Pre-verification error" and "Rejected by
    CERT at depth=N").  With ``let_pass`` the failure is then accepted, and the caller must
    act on every reported one: this is what ``redirect`` is made of.  Without it OpenSSL's
    verdict stands and the callback only takes notes for the log.
    """
    ptr = handle(ctx)
    lib = _lib()

    def callback(preverify_ok: int, store: int | None) -> int:
        if preverify_ok:
            return 1
        try:
            err = lib.store_error(store)
            text = (lib.error_string(err) or b"certificate verify failed").decode("ascii", "replace")
            on_error(text, lib.store_depth(store), _current_der(lib, store))
        except BaseException:  # noqa: BLE001 - never unwind through OpenSSL: refuse instead
            return 0
        return 1 if let_pass else 0

    c_callback = _VERIFY_CB(callback)
    _KEEP[ptr] = c_callback
    lib.set_verify(ptr, lib.get_verify_mode(ptr), c_callback)
    return True


def _current_der(lib: _Lib, store: int | None) -> bytes:
    """The DER of the certificate a verify callback is called for (b"" if there is none)."""
    cert = lib.store_cert(store)
    size = lib.i2d_x509(cert, None) if cert else 0
    if size <= 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    out = ctypes.c_void_p(ctypes.addressof(buf))
    written = lib.i2d_x509(cert, ctypes.byref(out))
    return buf.raw[:written] if written > 0 else b""


def session_cache(ctx: ssl.SSLContext, size: int, timeout: int, enabled: bool) -> bool:
    """stunnel's ``sessionCacheSize`` (0 = unlimited), ``sessionCacheTimeout`` and
    ``sessionResume = no`` (no session cache and no TLS 1.2 tickets; TLS 1.3 tickets are
    switched off through ``num_tickets``)."""
    ptr = handle(ctx)
    lib = _lib()
    lib.ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    lib.set_timeout(ptr, timeout)
    if not enabled:
        lib.ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
    return True


def ticket_keys(ctx: ssl.SSLContext, name: bytes, hmac_key: bytes, aes_key: bytes) -> bool:
    """Fixed session ticket keys (16-byte name, 32-byte HMAC key, 32-byte AES key): tickets
    stay valid across a reload and between processes that share the secrets."""
    if len(name) != 16 or len(hmac_key) != 32 or len(aes_key) != 32:
        raise ValueError("ticket keys: 16-byte name, 32-byte HMAC and AES keys")
    ptr = handle(ctx)
    keys = ctypes.create_string_buffer(name + hmac_key + aes_key, 80)
    if _lib().ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, ctypes.cast(keys, ctypes.c_void_p)) != 1:
        raise Unavailable("OpenSSL refused the session ticket keys")
    return True


def client_ca_list(ctx: ssl.SSLContext, cafile: str | None, capath: str | None) -> bool:
    """The CA names a server sends in its CertificateRequest (``SSL_CTX_set_client_CA_list``),
    from CAfile and the certificates of CApath, as stunnel does: clients holding several
    certificates (browsers, Java key stores, SChannel) choose theirs by these names."""
    ptr = handle(ctx)
    lib = _lib()
    names = lib.load_client_ca(cafile.encode()) if cafile else None
    if capath:
        if not names:
            names = lib.name_stack_new()
        if names:
            lib.add_dir_subjects(names, capath.encode())
    if not names:
        return False
    lib.set_client_ca(ptr, names)  # the context owns the list from here
    return True


def ciphersuites(ctx: ssl.SSLContext, text: str) -> bool:
    """``SSL_CTX_set_ciphersuites``: the TLS 1.3 ciphersuites; False when none is valid."""
    return bool(_lib().set_ciphersuites(handle(ctx), text.encode()))


def groups(ctx: ssl.SSLContext, text: str) -> bool:
    """``SSL_CTX_set1_groups_list``: the key exchange groups in order; False when invalid."""
    ptr = handle(ctx)
    names = ctypes.c_char_p(text.encode())
    result: int = _lib().ctrl(ptr, SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.cast(names, ctypes.c_void_p))
    return result == 1


def conf_commands(ctx: ssl.SSLContext, commands: list[tuple[str, str]], server: bool) -> None:
    """stunnel's ``config = COMMAND:VALUE``: OpenSSL's SSL_CONF commands, as in a config
    file section (``MinProtocol``, ``Options``, ``SignatureAlgorithms``, ...), in order.
    Raises ValueError with stunnel's wording for a command OpenSSL does not take."""
    ptr = handle(ctx)
    lib = _lib()
    cctx = lib.conf_new()
    if not cctx:
        raise Unavailable("SSL_CONF_CTX_new failed")
    try:
        side = SSL_CONF_FLAG_SERVER if server else SSL_CONF_FLAG_CLIENT
        lib.conf_flags(cctx, SSL_CONF_FLAG_FILE | side | SSL_CONF_FLAG_CERTIFICATE)
        lib.conf_ctx(cctx, ptr)
        for command, value in commands:
            result = lib.conf_cmd(cctx, command.encode(), value.encode())
            if result == -2:
                raise ValueError(f'OpenSSL config command "{command}" was not recognised')
            if result <= 0:
                raise ValueError(
                    f'OpenSSL config command "{command}" returned error: "{value}" is not a valid value'
                )
        if lib.conf_finish(cctx) != 1:
            raise ValueError("OpenSSL config commands could not be applied (SSL_CONF_CTX_finish)")
    finally:
        lib.conf_free(cctx)


def verify_store(ctx: ssl.SSLContext, uri: str) -> bool:
    """``SSL_CTX_load_verify_store``: trusted certificates from an OSSL_STORE URI (OpenSSL 3)."""
    return bool(_lib().load_store(handle(ctx), uri.encode()))


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    """One more libssl/libcrypto function, with its prototype."""
    try:
        fn = getattr(_lib().raw, name)
    except AttributeError as exc:
        raise Unavailable(f"cannot reach {name} in Python's OpenSSL ({exc})") from None
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def use_key_and_chain(ctx: ssl.SSLContext, key_der: bytes, cert_der: bytes, chain_der: list[bytes]) -> None:
    """Load a private key (DER, any type) and its certificate chain (DER) into the context
    from memory: no file is written (PKCS#12 ``cert``).  Raises ValueError when OpenSSL
    refuses them, with its reason."""
    ptr = handle(ctx)
    vp, cp, pp = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)
    d2i_key = _fn("d2i_AutoPrivateKey", vp, vp, pp, ctypes.c_long)
    pkey_free = _fn("EVP_PKEY_free", None, vp)
    use_key = _fn("SSL_CTX_use_PrivateKey", ctypes.c_int, vp, vp)
    use_cert = _fn("SSL_CTX_use_certificate_ASN1", ctypes.c_int, vp, ctypes.c_int, cp)
    d2i_x509 = _fn("d2i_X509", vp, vp, pp, ctypes.c_long)
    x509_free = _fn("X509_free", None, vp)
    check = _fn("SSL_CTX_check_private_key", ctypes.c_int, vp)
    clear = _fn("ERR_clear_error", None)
    if use_cert(ptr, len(cert_der), cert_der) != 1:
        clear()
        raise ValueError("OpenSSL refused the certificate (too weak for securityLevel, or malformed)")
    key_buf = ctypes.create_string_buffer(key_der, len(key_der))
    try:
        cursor = ctypes.c_char_p(ctypes.addressof(key_buf))
        pkey = d2i_key(None, ctypes.byref(cursor), len(key_der))
        if not pkey:
            clear()
            raise ValueError("OpenSSL cannot read the private key")
        try:
            ok = use_key(ptr, pkey) == 1 and check(ptr) == 1
        finally:
            pkey_free(pkey)  # the context holds its own reference
    finally:
        ctypes.memset(key_buf, 0, len(key_der))
    if not ok:
        clear()
        raise ValueError("the private key does not match the certificate")
    for der in chain_der:
        cursor = ctypes.c_char_p(der)
        x509 = d2i_x509(None, ctypes.byref(cursor), len(der))
        if not x509 or _lib().ctrl(ptr, SSL_CTRL_CHAIN_CERT, 0, x509) != 1:  # add0: the context owns it
            if x509:
                x509_free(x509)
            clear()
            raise ValueError("OpenSSL refused a chain certificate")

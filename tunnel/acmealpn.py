"""tls-alpn-01 (RFC 8737) answered inside OpenSSL's ALPN selection: only a client that offers
``acme-tls/1`` ever sees a challenge certificate.

* **Publishing**: while an order runs, each pending domain's challenge certificate (key +
  certificate, PEM) is a file, ``ACMEdir/SERVICE/tls-alpn-01/DOMAIN.pem`` (directory 0700,
  file 0600, written atomically), removed when the order ends (:func:`publish`,
  :func:`clear`).  A file is shared by every process of the service: with ``--workers N`` one
  worker orders, and a validation that the kernel hands to any worker is answered.
* **Answering**: every context of an ACME service (the live one in each process, and the
  temporary responder before the first bind) gets an ALPN select callback (:func:`install`).
  When the client offers ``acme-tls/1`` *and* its server name is one of the service's
  ``ACMEdomain`` with a published file, the callback selects ``acme-tls/1`` and puts the
  challenge certificate and key on that one connection (``SSL_use_certificate`` /
  ``SSL_use_PrivateKey``, as Apache's mod_md does; OpenSSL chooses the certificate after
  ALPN).  Everyone else, the same server name included, goes on to the service's own
  ``alpn`` choice (tunnel/alpn.py) with the service's certificate.

Imports acme (paths, atomic writes), alpn, ossl and settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import ssl
from pathlib import Path
from typing import Any

from tunnel import acme, alpn, ossl
from tunnel.settings import ServiceSettings

TLSEXT_NAMETYPE_host_name = 0
_NAME = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")  # a DNS name, safe as a file name


class _Lib:
    """libssl/libcrypto calls, reached through the library Python's ssl module uses."""

    def __init__(self) -> None:
        try:
            lib = ossl.library()
            self.servername = lib.SSL_get_servername
            self.bio_new = lib.BIO_new_mem_buf
            self.bio_free = lib.BIO_free
            self.read_x509 = lib.PEM_read_bio_X509
            self.read_key = lib.PEM_read_bio_PrivateKey
            self.x509_free = lib.X509_free
            self.key_free = lib.EVP_PKEY_free
            self.use_cert = lib.SSL_use_certificate
            self.use_key = lib.SSL_use_PrivateKey
            self.clear_errors = lib.ERR_clear_error
        except (OSError, AttributeError) as exc:
            raise ossl.Unavailable(f"cannot reach OpenSSL for tls-alpn-01 ({exc})") from None
        vp = ctypes.c_void_p
        self.servername.argtypes, self.servername.restype = [vp, ctypes.c_int], ctypes.c_char_p
        self.bio_new.argtypes, self.bio_new.restype = [ctypes.c_char_p, ctypes.c_int], vp
        self.bio_free.argtypes, self.bio_free.restype = [vp], ctypes.c_int
        for fn in (self.read_x509, self.read_key):
            fn.argtypes, fn.restype = [vp, vp, vp, vp], vp
        for fn in (self.x509_free, self.key_free):
            fn.argtypes, fn.restype = [vp], None
        for fn in (self.use_cert, self.use_key):
            fn.argtypes, fn.restype = [vp, vp], ctypes.c_int
        self.clear_errors.argtypes, self.clear_errors.restype = [], None

    def _read(self, pem: bytes, reader: Any) -> int | None:
        bio = self.bio_new(pem, len(pem))
        if not bio:
            return None
        try:
            return reader(bio, None, None, None) or None
        finally:
            self.bio_free(bio)

    def use(self, ssl_ptr: int, pem: bytes) -> bool:
        """The challenge certificate and key on this connection only."""
        cert, key = self._read(pem, self.read_x509), self._read(pem, self.read_key)
        try:
            ok = bool(cert and key and self.use_cert(ssl_ptr, cert) == 1 and self.use_key(ssl_ptr, key) == 1)
        finally:
            if cert:
                self.x509_free(cert)
            if key:
                self.key_free(key)
        if not ok:
            self.clear_errors()  # never leave an error behind for Python's ssl to report
        return ok


_LIB: _Lib | None = None


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def challenge_dir(svc: ServiceSettings) -> Path:
    return acme.state_dir(svc) / "tls-alpn-01"


def _file(svc: ServiceSettings, domain: str) -> Path:
    name = domain.lower().rstrip(".")
    if not _NAME.match(name):
        raise acme.AcmeError(f"tls-alpn-01: {domain!r} is not a DNS name")
    return challenge_dir(svc) / f"{name}.pem"


def publish(svc: ServiceSettings, domain: str, pem: bytes) -> None:
    """Make ``domain``'s challenge certificate visible to every process of the service."""
    folder = challenge_dir(svc)
    acme.private_dir(folder)
    acme.write_private(_file(svc, domain), pem)


def clear(svc: ServiceSettings) -> None:
    """The order is over: no challenge certificate is served any more."""
    with contextlib.suppress(OSError):
        for path in challenge_dir(svc).glob("*.pem"):
            path.unlink(missing_ok=True)


def install(ctx: ssl.SSLContext, svc: ServiceSettings, fallback: str | None) -> None:
    """The ALPN select callback of an ACME service's server context: challenge for a
    validation, else ``fallback`` (the service's ``alpn`` line, or none: no ALPN)."""
    lib = _lib()
    domains = {d.lower().rstrip(".") for d in svc.ACMEdomain}
    wanted = [acme.ACME_TLS_ALPN.encode()]

    def answer(ssl_ptr: int, offered: bytes) -> int | None:
        at = alpn.select(wanted, offered)
        if at is None:
            return None
        raw = lib.servername(ssl_ptr, TLSEXT_NAMETYPE_host_name)
        name = raw.decode("ascii", "replace").lower().rstrip(".") if raw else ""
        if name not in domains:
            return None
        try:
            pem = _file(svc, name).read_bytes()
        except (OSError, acme.AcmeError):
            return None  # no validation pending for it: the service answers as usual
        return at if lib.use(ssl_ptr, pem) else None

    alpn.configure(ctx, fallback, server=True, hook=answer)

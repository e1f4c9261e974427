"""SSLContext builders: one :class:`TlsConfig` per service per (re)load, never per connection.

:func:`build` runs one named step per group of options, in the order stunnel applies them;
the checks made after the handshake live in tunnel/verify.py, and what the handshake's
callbacks note for the data path in tunnel/tlsnotes.py.

Verification mapping (stunnel -> OpenSSL through Python's ``ssl``):

* ``verifyChain = yes``: ``CERT_REQUIRED`` against CAfile/CApath (or, in client
  mode under ``pytunnel run``, the system store when neither is given).
* ``verifyPeer = yes``: the peer's leaf must be one of the certificates in
  CAfile/CApath.  ``VERIFY_X509_PARTIAL_CHAIN`` lets OpenSSL accept a leaf that is
  itself in the trust store (verifyPeer alone; with verifyChain the chain must still end
  at a CA, as in stunnel); then the leaf is compared byte for byte.
* ``checkHost``/``checkIP``/``checkEmail``: checked on the leaf after the handshake
  (tunnel/verify.py); any one match is enough, as in stunnel.
* ``verify = 0..4``: the legacy levels, mapped onto the above.
* ``pytunnel run`` (secure mode) verifies a client-mode upstream by default: the chain
  and the name it connects to (``sni`` or the ``connect`` host).
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunnel import kex, ossl
from tunnel.settings import ServiceSettings, version_range
from tunnel.tlsnotes import SLOT
from tunnel.values import SSL_OPTIONS
from tunnel.verify import NamesCache, Policy, check_peer, pinned_certs, policy_for

if TYPE_CHECKING:
    from cryptography import x509

    from tunnel.ocsp import OcspPolicy
    from tunnel.stapling import Stapler

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_CURVE_NAMES = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1"}


class TlsConfigError(Exception):
    """A TLS setting or file could not be used; the message names the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass
class TlsConfig:
    """Everything a connection needs from TLS: the context and the post-handshake checks.

    One per service per (re)load: :func:`build` makes it, connections only read it."""

    context: ssl.SSLContext
    policy: Policy
    pinned: frozenset[bytes] = field(default_factory=frozenset)
    generation: int = 0
    redirect: bool = False  # server: a client failing verification goes to `redirect`
    ocsp: OcspPolicy | None = None  # OCSP / OCSPaia with verifyChain: checked after the handshake
    # client with verifyChain: a staple is asked for; the policy that checks it, made when needed
    staple_policy: Callable[[], OcspPolicy] | None = None
    stapler: Stapler | None = None  # server: the OCSP response it staples (tunnel/stapling.py)
    _names_cache: NamesCache = field(default_factory=dict, repr=False)

    def check_peer(self, der: bytes | None, expected_name: str | None) -> str | None:
        """Return None when the peer passes, else the reason (OpenSSL-like wording)."""
        return check_peer(self.policy, self.pinned, self._names_cache, der, expected_name)


def build(svc: ServiceSettings, secure: bool, generation: int = 0) -> TlsConfig:
    """Build the TLS configuration of one service.  Raises TlsConfigError."""
    pol = policy_for(svc, secure)
    server = not svc.client
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _set_versions(ctx, svc)
    _set_options(ctx, svc)
    _set_ciphers(ctx, svc)
    _set_groups(ctx, svc, secure)
    _set_ciphersuites(ctx, svc)
    if svc.cert:
        _load_cert_chain(ctx, svc.cert, svc.key)
    elif svc.key:
        raise TlsConfigError("key", "key is set but cert is not")
    _load_trust(ctx, svc, pol)
    _load_crls(ctx, svc)
    if pol.verify_peer and not pol.verify_chain:
        # verifyPeer alone: a leaf in CAfile/CApath is its own anchor; with verifyChain the
        # chain must still end at a CA, as in stunnel (verify = 3 refuses a pinned leaf
        # whose issuer is unknown)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if svc.PSKsecrets:
        _set_psk(ctx, svc)
    _set_verify_mode(ctx, svc, pol)
    _sessions(ctx, svc)
    if svc.config:
        _conf_commands(ctx, svc)
    _set_verify_callback(ctx, svc, pol)
    if svc.alpn:
        _set_alpn(ctx, svc)
    if svc.ACMEdirectory and server:  # tls-alpn-01 answered on the live port (tunnel/acmeserve.py)
        from tunnel import acmeserve

        try:
            acmeserve.install(ctx, svc)
        except ossl.Unavailable as exc:
            raise TlsConfigError(
                "ACMEdirectory", f"tls-alpn-01: not available with this Python: {exc}"
            ) from None
    return TlsConfig(
        context=ctx,
        policy=pol,
        pinned=pinned_certs(svc) if pol.verify_peer else frozenset(),
        generation=generation,
        redirect=bool(svc.redirect) and server,
        ocsp=_ocsp_policy(svc) if (svc.OCSP or svc.OCSPaia) and pol.verify_chain else None,
        staple_policy=functools.cache(functools.partial(_ocsp_policy, svc)) if _asks_staple(svc) else None,
        stapler=_stapler(ctx, svc) if server and svc.cert and not svc.PSKsecrets else None,
    )


def _set_versions(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """Protocol versions: TLS 1.2 is the floor unless configured."""
    lo, hi = version_range(svc)
    try:
        ctx.minimum_version = (
            ssl.TLSVersion.MINIMUM_SUPPORTED
            if lo == "all"
            else _VERSIONS.get(lo or "TLSv1.2", ssl.TLSVersion.TLSv1_2)
        )
        ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED if hi in (None, "all") else _VERSIONS[hi or ""]
    except (ValueError, KeyError) as exc:
        raise TlsConfigError("sslVersion", str(exc)) from None


def _set_options(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """stunnel's defaults plus the configured options, in order.  CPython turns on
    CIPHER_SERVER_PREFERENCE for every context; stunnel does not (the client's order wins)."""
    opts = (ctx.options & ~ssl.OP_CIPHER_SERVER_PREFERENCE) | ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3
    for item in svc.options:
        if item.startswith("-"):
            opts &= ~SSL_OPTIONS[item[1:]]
        else:
            opts |= SSL_OPTIONS[item]
    if not svc.renegotiation:
        opts |= ssl.OP_NO_RENEGOTIATION
    ctx.options = opts


def _set_ciphers(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """``ciphers`` and ``securityLevel``: a "@SECLEVEL=N" in ciphers is honoured unless
    securityLevel is set as well."""
    own_level = "@SECLEVEL" in svc.ciphers.upper() and "securityLevel" not in svc.model_fields_set
    try:
        ctx.set_ciphers(svc.ciphers if own_level else f"{svc.ciphers}:@SECLEVEL={svc.securityLevel}")
    except ssl.SSLError:
        raise TlsConfigError("ciphers", f"no usable cipher in {svc.ciphers!r}") from None


def _set_groups(ctx: ssl.SSLContext, svc: ServiceSettings, secure: bool) -> None:
    """``curves``: OpenSSL's group list, as stunnel sets it (names in any case: x25519,
    secp256r1, P-256, and X25519MLKEM768 on OpenSSL >= 3.5).  Without a curves line,
    ``pytunnel run`` keeps OpenSSL's defaults: post-quantum hybrids first (tunnel/kex.py)."""
    if kex.keep_openssl_default("curves" in svc.model_fields_set, secure):
        return
    default_curves = ServiceSettings.model_fields["curves"].default
    if (
        svc.curves == default_curves
    ):  # stunnel's default groups and order (OpenSSL's would add the FFDHE groups)
        _ossl_default(lambda: ossl.groups(ctx, default_curves))
        return
    try:
        ok = ossl.groups(ctx, svc.curves)
    except ossl.Unavailable as exc:
        if ":" in svc.curves:
            raise TlsConfigError(
                "curves", f"a list of groups is not available with this Python: {exc}"
            ) from None
        try:  # one group: Python's own call
            ctx.set_ecdh_curve(_CURVE_NAMES.get(svc.curves, svc.curves))
            ok = True
        except (ValueError, ssl.SSLError):
            ok = False
    if not ok:
        raise TlsConfigError("curves", kex.unknown_group_hint(svc.curves))


def _set_ciphersuites(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    if svc.ciphersuites == ServiceSettings.model_fields["ciphersuites"].default:
        _ossl_default(lambda: ossl.ciphersuites(ctx, svc.ciphersuites))  # stunnel's order
    else:
        _ossl(
            "ciphersuites",
            lambda: ossl.ciphersuites(ctx, svc.ciphersuites),
            f"no usable TLS 1.3 ciphersuite in {svc.ciphersuites!r}",
        )


def _load_trust(ctx: ssl.SSLContext, svc: ServiceSettings, pol: Policy) -> None:
    """CAfile, CApath, CAstore; the system store when the chain is verified without them."""
    try:
        if svc.CAfile:
            ctx.load_verify_locations(cafile=svc.CAfile)
        if svc.CApath:
            if not os.path.isdir(svc.CApath):
                raise TlsConfigError("CApath", f"{svc.CApath} is not a directory")
            ctx.load_verify_locations(capath=svc.CApath)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            "CAfile" if svc.CAfile else "CApath", f"cannot load {svc.CAfile or svc.CApath}: {exc}"
        ) from None
    if svc.CAstore:
        _ossl("CAstore", lambda: ossl.verify_store(ctx, svc.CAstore or ""), f"cannot load {svc.CAstore}")
    if pol.verify_chain and not (svc.CAfile or svc.CApath or svc.CAstore):
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH if svc.client else ssl.Purpose.CLIENT_AUTH)


def _load_crls(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """CRLfile and CRLpath: the leaf is checked against them."""
    if not (svc.CRLfile or svc.CRLpath):
        return
    try:
        if svc.CRLfile:
            with open(svc.CRLfile, "rb") as fh:
                if b"-----BEGIN X509 CRL-----" not in fh.read():
                    raise ssl.SSLError("no CRL in it (PEM routines::no start line)")
            ctx.load_verify_locations(cafile=svc.CRLfile)
        if svc.CRLpath:
            ctx.load_verify_locations(capath=svc.CRLpath)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            "CRLfile" if svc.CRLfile else "CRLpath", f"cannot load {svc.CRLfile or svc.CRLpath}: {exc}"
        ) from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _set_verify_mode(ctx: ssl.SSLContext, svc: ServiceSettings, pol: Policy) -> None:
    """Whether a certificate is asked for, and whether OpenSSL requires it."""
    if svc.client:
        ctx.verify_mode = ssl.CERT_REQUIRED if (pol.verify_chain or pol.verify_peer) else ssl.CERT_NONE
    elif pol.request_cert:
        # redirect: a client without a certificate completes the handshake and is redirected
        ctx.verify_mode = ssl.CERT_REQUIRED if pol.require_cert and not svc.redirect else ssl.CERT_OPTIONAL
        if svc.CAfile or svc.CApath:  # the CA names clients choose their certificate by
            _ossl_default(lambda: ossl.client_ca_list(ctx, svc.CAfile, svc.CApath))
    else:
        ctx.verify_mode = ssl.CERT_NONE


def _conf_commands(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """``config = COMMAND:VALUE`` lines through OpenSSL's SSL_CONF."""
    commands = [(c.partition(":")[0].strip(), c.partition(":")[2].strip()) for c in svc.config]
    try:
        ossl.conf_commands(ctx, commands, not svc.client)
    except ValueError as exc:
        raise TlsConfigError("config", str(exc)) from None
    except ossl.Unavailable as exc:
        raise TlsConfigError("config", f"not available with this Python: {exc}") from None


def _set_verify_callback(ctx: ssl.SSLContext, svc: ServiceSettings, pol: Policy) -> None:
    """A server whose OpenSSL verdict is noted (redirect) or overruled (verification off);
    elsewhere a failure is only noted, for stunnel's CERT lines before the handshake's."""
    server = not svc.client
    if svc.redirect and server:
        _ossl("redirect", lambda: ossl.verify_errors(ctx, _note_verify_error), "")
    elif server and pol.request_cert and not (pol.verify_chain or pol.verify_peer):
        # verify = 0, or requireCert = yes alone: ask for a certificate and take any (stunnel's
        # "Certificate verification disabled"); Python's ssl verifies every certificate it asks
        # for, so OpenSSL's verdict is overruled through a verify callback
        _ossl("requireCert" if svc.requireCert else "verify", lambda: ossl.verify_errors(ctx, _ignore), "")
    elif ctx.verify_mode != ssl.CERT_NONE and (pol.verify_chain or pol.verify_peer):
        _ossl_default(lambda: ossl.verify_errors(ctx, _note_verify_error, let_pass=False))


def _set_alpn(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """``alpn`` (pytunnel): offered in client mode, chosen in server mode (tunnel/alpn.py)."""
    from tunnel import alpn

    try:
        alpn.configure(ctx, svc.alpn or "", server=not svc.client)
    except ValueError as exc:
        raise TlsConfigError("alpn", str(exc)) from None
    except ossl.Unavailable as exc:
        raise TlsConfigError("alpn", f"not available with this Python: {exc}") from None


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        with open(cert, "rb") as fh:
            head = fh.read()
    except OSError as exc:
        raise TlsConfigError("cert", f"cannot read {cert}: {exc.strerror}") from None
    if b"-----BEGIN" not in head:
        _load_pkcs12(ctx, cert, head)
        return
    try:
        ctx.load_cert_chain(cert, key or cert)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            "key" if key else "cert",
            f"cannot use {cert} with key {key or cert}: {exc.reason or exc}",
        ) from None
    except OSError as exc:
        raise TlsConfigError("key", f"cannot read {key}: {exc.strerror}") from None


def _load_pkcs12(ctx: ssl.SSLContext, path: str, data: bytes) -> None:
    """A PKCS#12 ``cert`` (no password): the key never touches a file system.  It goes to
    OpenSSL from memory through tunnel.ossl; where that bridge is unavailable, through an
    anonymous memfd (``/proc/self/fd``), never a temporary file."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

    try:
        pkey, leaf, extra = pkcs12.load_key_and_certificates(data, None)
    except ValueError as exc:
        raise TlsConfigError("cert", f"{path} is neither PEM nor PKCS#12: {exc}") from None
    if pkey is None or leaf is None:
        raise TlsConfigError("cert", f"PKCS#12 file {path} lacks a key or certificate")
    chain = [leaf, *(extra or [])]
    try:
        key_der = pkey.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        ossl.use_key_and_chain(
            ctx,
            key_der,
            chain[0].public_bytes(Encoding.DER),
            [c.public_bytes(Encoding.DER) for c in chain[1:]],
        )
        return
    except ValueError as exc:
        raise TlsConfigError("cert", f"cannot use PKCS#12 file {path}: {exc}") from None
    except ossl.Unavailable:
        pass
    pem = pkey.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pem += b"".join(c.public_bytes(Encoding.PEM) for c in chain)
    fd = os.memfd_create("pytunnel-p12", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError("cert", f"cannot use PKCS#12 file {path}: {exc}") from None
    finally:
        os.close(fd)


def _ca_certs(svc: ServiceSettings) -> tuple[x509.Certificate, ...]:
    """CAfile's certificates, for OCSP (the chain's root, the responder's trust)."""
    from cryptography import x509

    if not svc.CAfile:
        return ()
    try:
        with open(svc.CAfile, "rb") as fh:
            return tuple(x509.load_pem_x509_certificates(fh.read()))
    except (OSError, ValueError) as exc:
        raise TlsConfigError("CAfile", f"cannot read {svc.CAfile} for OCSP: {exc}") from None


def _asks_staple(svc: ServiceSettings) -> bool:
    """A client asks for a stapled OCSP response when verifyChain is configured (stunnel
    5.71+), not under ``pytunnel run``'s implicit verification."""
    return bool(svc.client) and (bool(svc.verifyChain) or svc.verify in (1, 2, 3))


def _stapler(ctx: ssl.SSLContext, svc: ServiceSettings) -> Stapler | None:
    """Server OCSP stapling (stunnel 5.71+): on when the certificate (PEM) names an OCSP
    responder; the status callback serves what tunnel/stapling.py fetched."""
    assert svc.cert
    try:
        with open(svc.cert, "rb") as fh:
            pem = fh.read()
    except OSError:
        return None
    if b"-----BEGIN" not in pem or b"CERTIFICATE-----" not in pem:
        return None  # PKCS#12: not stapled
    from tunnel import osslconn, stapling

    trust: tuple[x509.Certificate, ...] = ()
    with contextlib.suppress(TlsConfigError):  # CAfile only helps find the issuer here
        trust = _ca_certs(svc)
    stapler = stapling.prepare(svc.name, pem, trust, float(svc.TIMEOUTocsp))
    if stapler is None:
        return None
    try:
        osslconn.serve_status(ctx, stapler.current)
    except ossl.Unavailable:
        return None
    return stapler


def _ocsp_policy(svc: ServiceSettings) -> OcspPolicy:
    """stunnel's OCSP options, once per (re)load; CAfile's certificates find the chain's root."""
    from tunnel.ocsp import OcspPolicy

    trust = _ca_certs(svc)
    return OcspPolicy(
        url=svc.OCSP,
        aia=bool(svc.OCSPaia),
        flags=frozenset(svc.OCSPflag),
        nonce=bool(svc.OCSPnonce),
        require=bool(svc.OCSPrequire),
        timeout=float(svc.TIMEOUTocsp),
        trust=trust,
    )


def _ossl_default(call: Callable[[], bool]) -> None:
    """One of stunnel's defaults through tunnel.ossl; where this Python's ssl module cannot
    be reached that way, OpenSSL's own default stays (nothing the user asked for is lost)."""
    with contextlib.suppress(ossl.Unavailable):
        call()


def _ossl(option: str, call: Callable[[], bool], failure: str) -> None:
    """Run one of tunnel.ossl's calls; its refusal or failure becomes this option's error."""
    try:
        ok = call()
    except ossl.Unavailable as exc:
        raise TlsConfigError(option, f"not available with this Python: {exc}") from None
    if not ok:
        raise TlsConfigError(option, failure)


def _ignore(_reason: str, _depth: int, _der: bytes) -> None:
    """A verification failure of a certificate nobody asked to verify."""


def _note_verify_error(reason: str, depth: int, der: bytes) -> None:
    notes = SLOT.notes
    if notes is None:  # not inside one of our handshakes: refuse, never let it pass
        raise RuntimeError("verify callback outside a handshake")
    if notes.verify_errors is None:
        notes.verify_errors = []
    notes.verify_errors.append((reason, depth, der))


def _sessions(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """sessionCacheSize/-Timeout, sessionResume = no and ticket keys on the SSL_CTX.

    A service with ``redirect`` resumes sessions as stunnel does: the session keeps OpenSSL's
    verification result and the peer's certificate, so a resumed session of a redirected
    peer is redirected again (tunnel/opening.py), one of an authenticated peer is served.
    """
    server = not svc.client
    resume = bool(svc.sessionResume)
    sized = svc.sessionCacheSize != 1000 or svc.sessionCacheTimeout != 300
    cache = lambda: ossl.session_cache(ctx, svc.sessionCacheSize, svc.sessionCacheTimeout, resume)  # noqa: E731
    if sized or (server and not resume):
        _ossl("sessionCacheSize" if sized else "sessionResume", cache, "")
    else:  # stunnel's defaults (1000 sessions, 300 s), not OpenSSL's (20480, 7200 s)
        _ossl_default(cache)
    if server and not resume:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    if server and svc.ticketKeySecret and svc.ticketMacSecret and resume:
        import hashlib

        aes, mac = svc.ticketKeySecret, svc.ticketMacSecret
        name = hashlib.sha256(b"pytunnel ticket key name" + aes + mac).digest()[:16]
        aes32 = aes if len(aes) == 32 else hashlib.sha256(aes).digest()
        mac32 = mac if len(mac) == 32 else hashlib.sha256(mac).digest()
        _ossl("ticketKeySecret", lambda: ossl.ticket_keys(ctx, name, mac32, aes32), "")


PSK_MAX_IDENTITY = 256  # OpenSSL's PSK_MAX_IDENTITY_LEN; stunnel's limit and wording
PSK_MAX_KEY = 512  # OpenSSL's PSK_MAX_PSK_LEN
PSK_MIN_KEY = 16


def read_psk_secrets(path: str) -> dict[str, bytes]:
    """stunnel's ``PSKsecrets`` file: ``IDENTITY:KEY`` lines, in order, first identity first.

    As stunnel 5.68 reads it: empty lines are skipped, there are no comments, the
    identity ends at the first colon, a key of an even number of hex digits is decoded
    (``00ff…``), any other key is taken as its bytes, and a key must be 16 to 512 bytes.
    An identity given twice keeps its first key, as stunnel's lookup does.
    """
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise TlsConfigError("PSKsecrets", f"cannot read {path}: {exc.strerror or exc}") from None
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(lines, 1):
        if not raw:
            continue
        ident, colon, text = raw.partition(b":")
        where = f"{path} line {number}"
        if not colon:
            raise TlsConfigError("PSKsecrets", f"{where}: Not in identity:key format")
        if len(ident) >= PSK_MAX_IDENTITY:
            raise TlsConfigError("PSKsecrets", f"{where}: Identity longer than {PSK_MAX_IDENTITY} characters")
        key = text
        if text and len(text) % 2 == 0:
            try:
                key = bytes.fromhex(text.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                key = text
        if len(key) < PSK_MIN_KEY:
            raise TlsConfigError("PSKsecrets", f"{where}: Key shorter than {PSK_MIN_KEY} bytes")
        if len(key) > PSK_MAX_KEY:
            raise TlsConfigError("PSKsecrets", f"{where}: Key longer than {PSK_MAX_KEY} bytes")
        keys.setdefault(ident.decode("utf-8", "surrogateescape"), key)
    if not keys:
        raise TlsConfigError("PSKsecrets", f"{path} holds no IDENTITY:KEY line")
    return keys


def _set_psk(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """TLS-PSK through Python 3.13's callbacks (TLS 1.2 PSK ciphers and TLS 1.3 external PSKs)."""
    keys = read_psk_secrets(svc.PSKsecrets or "")
    # Python 3.13's API, reached by name: the type stubs of Python 3.11 do not know it
    set_server = getattr(ctx, "set_psk_server_callback", None)
    set_client = getattr(ctx, "set_psk_client_callback", None)
    if not getattr(ssl, "HAS_PSK", False) or set_server is None or set_client is None:
        raise TlsConfigError("PSKsecrets", "this Python's ssl module has no TLS-PSK support")
    if not svc.client:

        def server_key(identity: str | None) -> bytes:
            # an unknown identity gets no key: OpenSSL ends the handshake with an alert
            key = keys.get(identity or "", b"")
            notes = SLOT.notes
            if notes is not None:
                notes.psk_identity, notes.psk_known = identity, bool(key)
            return key

        set_server(server_key)
        return
    identity = svc.PSKidentity or next(iter(keys))
    if identity not in keys:
        raise TlsConfigError(
            "PSKidentity", f"No key found for the specified PSK identity {identity!r} in {svc.PSKsecrets}"
        )
    chosen = (identity, keys[identity])

    def client_key(_hint: str | None) -> tuple[str, bytes]:
        if SLOT.notes is not None:
            SLOT.notes.psk_identity = identity
        return chosen

    set_client(client_key)


def client_sni(svc: ServiceSettings, target_host: str | None) -> str | None:
    """The name to send: ``sni``, else (``protocol = connect``) protocolHost's host, else the
    connect host, else ``localhost``."""
    if svc.sni is not None:
        return svc.sni or None
    if svc.protocolHost and (svc.protocol or "").lower() == "connect":  # TLS runs with protocolHost
        host, colon, _port = svc.protocolHost.rpartition(":")
        return host.strip("[]") if colon and host else "localhost"
    if target_host:
        return target_host
    return "localhost"

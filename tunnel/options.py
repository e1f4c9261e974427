"""The single source of truth for every stunnel option pytunnel knows: the pydantic models.

Each option is a pydantic field: its stunnel spelling is the alias, its type does
the parsing, and ``json_schema_extra`` says whether it may repeat, where it may
appear, and -- when pytunnel does not implement it -- exactly why.  The value parsers
live in ``values.py`` (this module wraps them in ``BeforeValidator``s); the rules between
options in ``rules.py``.

The run path does not import this module (pydantic costs ~60 ms and ~12 MiB at start-up):
``tools/gen_settings.py`` writes ``settings_table.py``, plain classes with the same fields,
defaults, validators, constraints and meta, from these models, and ``settings.py`` serves
them.  The options table (README), ``pytunnel check`` and the tests read these models; a
test runs every option through both and fails when the generated module is stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import ValidationError as PydanticError
from pydantic.fields import FieldInfo

from tunnel import values
from tunnel.addr import Endpoint
from tunnel.plain import Scope, ValidationError, field_extra
from tunnel.sockopts import SocketOption

# Building these models asks pydantic for plugins, which scans the metadata of every
# installed distribution (~50-70 ms of start-up).  pytunnel uses none: skip the scan while
# this module builds its models, unless the user set PYDANTIC_DISABLE_PLUGINS themselves.
_PLUGINS_ENV = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
os.environ["PYDANTIC_DISABLE_PLUGINS"] = _PLUGINS_ENV if _PLUGINS_ENV is not None else "__all__"


# ------------------------------------------------------------------ value types


def choice(*choices: str, message: str | None = None) -> BeforeValidator:
    """One of ``choices`` (``values.one_of``)."""
    return BeforeValidator(values.one_of(*choices, message=message))


YesNo = Annotated[bool, BeforeValidator(values.yes_no)]
Seconds = Annotated[int, BeforeValidator(values.to_int), Field(ge=0)]
Count = Annotated[int, BeforeValidator(values.to_int), Field(ge=0)]
Addr = Annotated[Endpoint, BeforeValidator(values.endpoint)]
TicketSecret = Annotated[bytes, BeforeValidator(values.ticket_secret)]
Debug = Annotated[tuple[str, int], BeforeValidator(values.debug_option)]
SslOption = Annotated[str, BeforeValidator(values.ssl_option)]
SockOpt = Annotated[SocketOption, BeforeValidator(values.socket_option)]
IPText = Annotated[str, BeforeValidator(values.ip_text)]
LocalAddr = Annotated[str, BeforeValidator(values.local_addr)]
Retry = Annotated[int, BeforeValidator(values.retry_delay), Field(ge=0)]
Transparent = Annotated[str, BeforeValidator(values.parse_mode)]
TlsVersion = Annotated[str, BeforeValidator(values.tls_version)]


# ------------------------------------------------------------------ field helper

#: alias -> the arguments of ``plain.field_extra`` as ``opt`` got them (the generator writes
#: them out, so that a Python-dependent option is decided where the plain module runs)
RAW_META: dict[str, dict[str, Any]] = {}


def opt(
    default: Any,
    alias: str,
    help: str,  # noqa: A002 - the word the docs use
    *,
    scope: Scope = "service",
    repeat: bool = False,
    unsupported: str | None = None,
    accepted: tuple[str, ...] = (),
    python: tuple[int, int] | None = None,
    extension: bool = False,
) -> Any:
    """Declare one stunnel option.

    ``unsupported``: why pytunnel rejects it.  ``accepted``: values that change
    nothing (the option switched off), which are accepted even when unsupported.
    ``python``: the oldest Python that supports it; older ones reject it, saying so.
    ``extension``: a pytunnel extension that stunnel does not know (the options table says so).
    """
    raw: dict[str, Any] = {"scope": scope, "repeat": repeat}
    for key, value, unset in (
        ("unsupported", unsupported, None),
        ("accepted", accepted, ()),
        ("python", python, None),
        ("extension", extension, False),
    ):
        if value != unset:
            raw[key] = value
    RAW_META[alias] = raw
    extra = field_extra(**raw)
    kwargs: dict[str, Any] = {"alias": alias, "description": help, "json_schema_extra": extra}
    if repeat:
        return Field(default_factory=list, **kwargs)
    return Field(default=default, **kwargs)


WIN = "it exists only in stunnel's Windows build"
GUI = "it configures stunnel's Windows GUI"
ENGINE = "OpenSSL engines cannot be reached through Python's ssl module"
NO_API = "Python's ssl module exposes no API for it"
PSK_API = "ssl.SSLContext.set_psk_server_callback"


class ServiceSettings(BaseModel):
    """Options valid in a ``[service]`` section (and, as defaults, in the global section)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    name: str = Field(default="stunnel", description="section name")
    #: option -> (file, line, text) of the line that set it, for error messages
    locations: dict[str, tuple[str, int, str]] = Field(default_factory=dict, repr=False)

    accept: list[Addr] = opt(
        None, "accept", "listen on [HOST:]PORT (or a Unix socket path); may repeat", repeat=True
    )
    connect: list[Addr] = opt(
        None,
        "connect",
        "connect to [HOST:]PORT (or a Unix socket path); may repeat for failover",
        repeat=True,
    )
    client: YesNo = opt(False, "client", "client mode: the remote side speaks TLS")
    cert: str | None = opt(None, "cert", "certificate chain file (PEM, or PKCS#12 with the key)")
    key: str | None = opt(None, "key", "private key file (default: the cert file)")
    CAfile: str | None = opt(None, "CAfile", "trusted CA (or peer, for verifyPeer) certificates, PEM")
    CApath: str | None = opt(None, "CApath", "directory of hashed CA certificates (XXXXXXXX.0)")
    CRLfile: str | None = opt(None, "CRLfile", "certificate revocation list, PEM")
    CRLpath: str | None = opt(None, "CRLpath", "directory of hashed CRLs (XXXXXXXX.r0)")
    checkEmail: list[str] = opt(
        None,
        "checkEmail",
        "accept the peer only with this e-mail in its certificate; may repeat",
        repeat=True,
    )
    checkHost: list[str] = opt(
        None, "checkHost", "accept the peer only for this host name; may repeat", repeat=True
    )
    checkIP: list[IPText] = opt(
        None, "checkIP", "accept the peer only for this IP address; may repeat", repeat=True
    )
    checkURI: list[str] = opt(
        None, "checkURI",
        "accept the peer only with this URI SAN (e.g. a SPIFFE ID; '*' stands for one whole path "
        "segment); may repeat",
        repeat=True, extension=True,
    )  # fmt: skip
    ACMEdirectory: str | None = opt(
        None, "ACMEdirectory",
        "server: obtain and renew the certificate from this ACME (RFC 8555) directory URL; no cert/key "
        "then (docs/acme.md)",
        extension=True,
    )  # fmt: skip
    ACMEdomain: list[str] = opt(
        None, "ACMEdomain", "ACME: a name the certificate is for; at least one", repeat=True, extension=True
    )  # fmt: skip
    ACMEemail: str | None = opt(None, "ACMEemail", "ACME: the account's contact address", extension=True)
    ACMECAfile: str | None = opt(
        None, "ACMECAfile", "ACME: CA certificates that verify the ACME server's HTTPS (a private CA)",
        extension=True,
    )  # fmt: skip
    ACMEchallenge: Annotated[str, choice("tls-alpn-01", "http-01")] = opt(
        "tls-alpn-01", "ACMEchallenge",
        "ACME: tls-alpn-01 (answered on the service's own accept port) or http-01 (on ACMEhttp)",
        extension=True,
    )  # fmt: skip
    ACMEhttp: Addr | None = opt(
        None, "ACMEhttp", "ACME http-01: [HOST:]PORT to answer the challenge on", extension=True
    )  # fmt: skip
    ACMEdir: str | None = opt(
        None, "ACMEdir",
        "ACME: directory for the account key and certificates (default $STATE_DIRECTORY, else "
        "/var/lib/pytunnel/acme)",
        extension=True,
    )  # fmt: skip
    ACMEtimeout: Seconds = opt(
        120, "ACMEtimeout", "ACME: seconds the first certificate may take before pytunnel gives up (exit 3)",
        extension=True,
    )  # fmt: skip
    alpn: str | None = opt(
        None, "alpn",
        "ALPN protocols, ','-separated (client: offered; server: chosen, first of this list the client "
        "offers)",
        extension=True,
    )  # fmt: skip
    ciphers: str = opt(
        "HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK", "ciphers", "TLS 1.2 and older cipher list (OpenSSL syntax)"
    )
    ciphersuites: str = opt(
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
        "ciphersuites",
        "TLS 1.3 ciphersuites (OpenSSL syntax)",
    )
    curves: str = opt(
        "X25519:P-256:X448:P-521:P-384",
        "curves",
        "ECDH groups, ':'-separated, in order of preference",
    )
    debug: Debug = opt(("daemon", 5), "debug", "log level 0-7 or emerg..debug, with optional syslog facility")
    delay: YesNo = opt(False, "delay", "resolve connect names at connection time (implies failover = prio)")
    failover: Annotated[str, choice("rr", "prio")] = opt(
        "prio", "failover", "strategy for several connect targets: rr or prio"
    )
    local: LocalAddr | None = opt(None, "local", "source address (IP or host name) for outgoing connections")
    logId: Annotated[str, choice("sequential", "unique", "thread", "process")] = opt(
        "sequential", "logId", "connection id in log lines"
    )
    options: list[SslOption] = opt(
        None, "options", "OpenSSL SSL_OP_* flag without prefix (-NAME clears); may repeat", repeat=True
    )
    renegotiation: YesNo = opt(True, "renegotiation", "allow TLS renegotiation")
    requireCert: YesNo = opt(False, "requireCert", "require a peer certificate")
    reset: YesNo = opt(True, "reset", "signal TLS errors to the plaintext peer with a TCP RST")
    retry: Retry = opt(0, "retry", "restart an exec+connect service: yes, no, or a delay in ms")
    securityLevel: Annotated[int, BeforeValidator(values.to_int), Field(ge=0, le=5)] = opt(
        2, "securityLevel", "OpenSSL security level 0-5"
    )
    sessionCacheSize: Count = opt(1000, "sessionCacheSize", "server session cache entries (0 = unlimited)")
    sessionCacheTimeout: Seconds = opt(300, "sessionCacheTimeout", "session lifetime in seconds")
    sessionResume: YesNo = opt(True, "sessionResume", "allow TLS session resumption")
    sni: str | None = opt(
        None, "sni", "client: server name to send; server: SERVICE:PATTERN for a virtual service"
    )
    socket: list[SockOpt] = opt(None, "socket", "a|l|r:OPTION=VALUE socket option; may repeat", repeat=True)
    sslVersion: TlsVersion | None = opt(
        None, "sslVersion", "TLS version (sets both sslVersionMin and sslVersionMax)"
    )
    sslVersionMax: TlsVersion | None = opt(None, "sslVersionMax", "highest TLS version (default: all)")
    sslVersionMin: TlsVersion | None = opt(None, "sslVersionMin", "lowest TLS version (default: TLSv1.2)")
    stack: Count = opt(
        65536, "stack", "thread stack size (no effect: pytunnel runs no thread per connection)"
    )
    TIMEOUTbusy: Seconds = opt(
        300, "TIMEOUTbusy", "seconds to wait for expected data (the TLS handshake, both modes)"
    )
    TIMEOUTclose: Seconds = opt(
        60, "TIMEOUTclose", "seconds to wait for the other side to finish after one closed"
    )
    TIMEOUTconnect: Seconds = opt(10, "TIMEOUTconnect", "seconds to connect to the remote (TCP)")
    TIMEOUTidle: Seconds = opt(43200, "TIMEOUTidle", "seconds an idle connection is kept")
    maxConnections: Count = opt(
        0, "maxConnections",
        "live connections the service serves at once (0 = no cap); more clients wait in the "
        "kernel's backlog until one ends (docs/edge.md)",
        extension=True,
    )  # fmt: skip
    acceptProxy: YesNo = opt(
        False, "acceptProxy",
        "every accepted connection starts with a PROXY v1/v2 header (from a load balancer): its "
        "address becomes the client's (docs/edge.md)",
        extension=True,
    )  # fmt: skip
    verify: Annotated[int, BeforeValidator(values.verify_level)] | None = opt(
        None, "verify", "legacy verify level 0-4 (use verifyChain/verifyPeer)"
    )
    verifyChain: YesNo | None = opt(None, "verifyChain", "verify the peer certificate chain")
    verifyPeer: YesNo | None = opt(None, "verifyPeer", "the peer certificate must be in CAfile/CApath")
    setuid: str | None = opt(
        None, "setuid", "global: drop privileges to USER; service: owner of a Unix accept socket"
    )
    setgid: str | None = opt(
        None, "setgid", "global: drop privileges to GROUP; service: group of a Unix accept socket"
    )

    # ---- known, not implemented (each says why)
    CAengine: str | None = opt(None, "CAengine", "CA certificates from an engine", unsupported=ENGINE)
    CAstore: str | None = opt(
        None,
        "CAstore",
        "trusted certificates from an OSSL_STORE URI (OpenSSL 3: file:PATH, or a provider's scheme)",
    )
    config: list[str] = opt(
        None,
        "config",
        "OpenSSL SSL_CONF command COMMAND:VALUE (as in openssl.cnf, e.g. MinProtocol:TLSv1.3)",
        repeat=True,
    )
    engineId: str | None = opt(None, "engineId", "engine for this service", unsupported=ENGINE)
    engineNum: str | None = opt(None, "engineNum", "engine number for this service", unsupported=ENGINE)
    exec: str | None = opt(
        None, "exec", "run a local program as one endpoint (instead of accept or of connect)"
    )
    execArgs: str | None = opt(None, "execArgs", "argv of the exec program ($0 $1 ...; no quoting)")
    ident: str | None = opt(None, "ident", "IDENT (RFC 1413): the user the client's identd must name")
    include: str | None = opt(None, "include", "include every file of a directory (handled by the reader)")
    libwrap: str | None = opt(
        None,
        "libwrap",
        "TCP Wrappers access control",
        unsupported="TCP Wrappers (libwrap) has no Python binding and distributions are dropping it; "
        "restrict clients with a firewall (nftables) or listen on a private address instead",
        accepted=("no",),
    )
    OCSP: str | None = opt(None, "OCSP", "OCSP responder URL (http://) for the peer's leaf certificate")
    OCSPaia: YesNo = opt(False, "OCSPaia", "check each chain certificate with its AIA OCSP responder URLs")
    OCSPflag: list[str] = opt(None, "OCSPflag", "OCSP verification flag (OpenSSL OCSP_* name)", repeat=True)
    OCSPnonce: YesNo = opt(False, "OCSPnonce", "send an OCSP nonce and require it in the answer")
    OCSPrequire: YesNo = opt(True, "OCSPrequire", "reject when no conclusive OCSP answer is obtained")
    TIMEOUTocsp: Seconds = opt(5, "TIMEOUTocsp", "seconds for one OCSP request (connect, send, answer)")
    protocol: str | None = opt(None, "protocol", "protocol negotiation before TLS (STARTTLS, CONNECT, ...)")
    protocolAuthentication: str | None = opt(
        None,
        "protocolAuthentication",
        "authentication for protocol negotiation (smtp: plain|login; connect: basic)",
    )
    protocolDomain: str | None = opt(
        None,
        "protocolDomain",
        "NTLM domain (connect)",
        unsupported="only NTLM uses it, and NTLM needs MD4 and DES, which Python's hashlib and "
        "OpenSSL 3 (without its legacy provider) do not offer",
    )
    protocolHeader: list[str] = opt(None, "protocolHeader", "extra CONNECT request header line", repeat=True)
    protocolHost: str | None = opt(
        None, "protocolHost", "SMTP EHLO name; CONNECT/SOCKS destination (HOST:PORT)"
    )
    protocolPassword: str | None = opt(None, "protocolPassword", "password for protocol authentication")
    protocolUsername: str | None = opt(None, "protocolUsername", "user for protocol authentication")
    PSKidentity: str | None = opt(
        None, "PSKidentity", "client mode: the identity to use from PSKsecrets (default: the first)",
        unsupported=PSK_API, python=(3, 13),
    )  # fmt: skip
    PSKsecrets: str | None = opt(
        None, "PSKsecrets", "TLS-PSK: file of IDENTITY:KEY lines (hex keys decoded; 16 to 512 bytes)",
        unsupported=PSK_API, python=(3, 13),
    )  # fmt: skip
    pty: YesNo = opt(False, "pty", "run exec on a pseudo-terminal (raw mode) instead of a socket pair")
    redirect: list[Addr] = opt(
        None,
        "redirect",
        "server mode: connect a client whose certificate fails verification to [HOST:]PORT instead",
        repeat=True,
    )
    sessiond: str | None = opt(
        None,
        "sessiond",
        "external session cache",
        unsupported="stunnel's sessiond UDP cache protocol is not implemented; to resume sessions across "
        "processes or restarts set ticketKeySecret and ticketMacSecret (shared ticket keys)",
    )
    ticketKeySecret: TicketSecret | None = opt(
        None, "ticketKeySecret", "server: session ticket encryption key, 16 or 32 bytes in hex"
    )
    ticketMacSecret: TicketSecret | None = opt(
        None, "ticketMacSecret", "server: session ticket HMAC key, 16 or 32 bytes in hex"
    )
    transparent: Transparent = opt(
        "none",
        "transparent",
        "transparent proxy (Linux): none, source (upstream from the client's address), destination "
        "(upstream to the client's original destination, no connect) or both; yes = source, no = none "
        "(routing: docs/transparent.md)",
    )


class GlobalSettings(BaseModel):
    """Options valid only before the first ``[section]``."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    chroot: str | None = opt(None, "chroot", "chroot jail directory", scope="global")
    foreground: Annotated[str, choice("yes", "quiet", "no")] = opt(
        "no",
        "foreground",
        "stay in the foreground: yes (also log to stderr), quiet, or no (daemonize)",
        scope="global",
    )
    log: Annotated[str, choice("append", "overwrite")] = opt(
        "append", "log", "how the output file is opened", scope="global"
    )
    output: str | None = opt(None, "output", "append log lines to this file", scope="global")
    pid: str | None = opt(
        None, "pid", "pid file (empty: none; pytunnel writes none by default)", scope="global"
    )
    RNDbytes: Count = opt(1024, "RNDbytes", "bytes read from RNDfile to seed the PRNG", scope="global")
    RNDfile: str | None = opt("/dev/urandom", "RNDfile", "random seed file", scope="global")
    RNDoverwrite: YesNo = opt(
        True, "RNDoverwrite", "rewrite the seed file with new random data", scope="global"
    )
    service: str = opt("stunnel", "service", "syslog ident and inetd-mode service name", scope="global")
    syslog: YesNo = opt(True, "syslog", "log via syslog", scope="global")
    fips: str | None = opt(
        None,
        "fips",
        "FIPS 140-2 mode",
        scope="global",
        unsupported="FIPS support is not available",
        accepted=("no",),
    )

    compression: str | None = opt(
        None,
        "compression",
        "TLS compression",
        scope="global",
        unsupported="TLS compression is not available in Python's OpenSSL build (and is unsafe: CRIME)",
    )
    EGD: str | None = opt(
        None,
        "EGD",
        "entropy gathering daemon socket",
        scope="global",
        unsupported="it needs an EGD build of stunnel; OpenSSL seeds itself from the kernel",
    )
    engine: str | None = opt(None, "engine", "OpenSSL engine", scope="global", unsupported=ENGINE)
    engineCtrl: str | None = opt(None, "engineCtrl", "engine control", scope="global", unsupported=ENGINE)
    engineDefault: str | None = opt(None, "engineDefault", "engine tasks", scope="global", unsupported=ENGINE)
    iconActive: str | None = opt(None, "iconActive", "GUI icon", scope="global", unsupported=GUI)
    iconError: str | None = opt(None, "iconError", "GUI icon", scope="global", unsupported=GUI)
    iconIdle: str | None = opt(None, "iconIdle", "GUI icon", scope="global", unsupported=GUI)
    provider: str | None = opt(
        None,
        "provider",
        "OpenSSL provider",
        scope="global",
        unsupported="OpenSSL providers cannot be loaded through Python's ssl module",
    )
    providerParameter: str | None = opt(
        None,
        "providerParameter",
        "provider parameter",
        scope="global",
        unsupported="OpenSSL providers cannot be loaded through Python's ssl module",
    )
    setEnv: list[str] = opt(
        None,
        "setEnv",
        "environment for exec children (VAR=VALUE)",
        scope="global",
        repeat=True,
    )
    taskbar: str | None = opt(None, "taskbar", "Windows taskbar icon", scope="global", unsupported=WIN)
    sandbox: YesNo | None = opt(
        None, "sandbox",
        "Landlock sandbox after start-up: yes or no (default: yes under pytunnel run where the kernel "
        "offers Landlock, no under pytunnel CONFIG) (docs/edge.md)",
        scope="global", extension=True,
    )  # fmt: skip
    workers: str | None = opt(
        None,
        "workers",
        "pytunnel only: processes serving the same ports (N or auto); stunnel does not know it",
        scope="global",
    )


def by_alias(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return {f.alias: f for f in model.model_fields.values() if f.alias}


SERVICE_FIELDS = by_alias(ServiceSettings)
GLOBAL_FIELDS = by_alias(GlobalSettings)


def field_meta(name: str) -> dict[str, Any]:
    info = SERVICE_FIELDS.get(name) or GLOBAL_FIELDS[name]
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def validator(model: type[BaseModel]) -> Callable[[dict[str, Any]], Any]:
    """``model.model_validate`` raising ``plain.ValidationError`` (what the reader catches),
    so that the reader can validate with either kind of model (``pytunnel check``)."""

    def validate(data: dict[str, Any]) -> Any:
        try:
            return model.model_validate(data)
        except PydanticError as exc:
            errors = [{"type": e["type"], "loc": e["loc"], "msg": e["msg"]} for e in exc.errors()]
            raise ValidationError(model.__name__, errors) from None

    return validate


def validators() -> tuple[Callable[[dict[str, Any]], Any], Callable[[dict[str, Any]], Any]]:
    """The models as ``conf.build`` takes them (global section, service)."""
    return validator(GlobalSettings), validator(ServiceSettings)


if _PLUGINS_ENV is None:
    del os.environ["PYDANTIC_DISABLE_PLUGINS"]

"""The value types of stunnel options: how one ``name = value`` line's value is parsed.

Each parser turns stunnel's text into the typed value (or raises ValueError with the one
sentence the reader reports).  The pydantic models (``options.py``) wrap them in
``BeforeValidator``s, and the plain models of the run path (``settings.py``, generated from
them) call the same functions; this module imports no pydantic (start-up time).  Also the
tables values are checked against (log levels, OpenSSL's SSL_OP_* names, TLS versions,
transparent modes) and the lookups of ``setuid``/``setgid`` names.

Imports addr and sockopts (the endpoint and socket-option parsers), nothing above them.
"""

from __future__ import annotations

import ipaddress
import re
import sys

from tunnel.addr import parse_endpoint
from tunnel.sockopts import parse_socket_option


def yes_no(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "yes":
            return True
        if low == "no":
            return False
    raise ValueError("The argument needs to be either 'yes' or 'no'")


def to_int(value: object) -> object:
    """A non-negative whole number written in decimal (stunnel's strtol, without the sign)."""
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"\+?[0-9]+", text):  # stunnel's strtol takes "+5" as 5
            raise ValueError(f"{text!r} is not a non-negative whole number")
        return int(text)
    return value


def verify_level(value: object) -> object:
    """stunnel's legacy ``verify`` level, 0 to 4 (its words when out of range)."""
    level = to_int(value)
    if isinstance(level, int) and not 0 <= level <= 4:
        raise ValueError("Bad verify level")
    return level


def endpoint(value: object) -> object:
    if isinstance(value, str):
        return parse_endpoint(value)
    return value


class one_of:  # lower case: it is called like the function it replaced
    """One of ``choices`` in any case; the value becomes the choice as spelled here.  The
    error is stunnel's: ``message``, or its words for a choice of two.  (Its ``repr`` is the
    call that makes it, which is how ``tools/gen_settings.py`` writes it out.)"""

    __slots__ = ("choices", "message", "__name__")

    def __init__(self, *choices: str, message: str | None = None) -> None:
        self.choices = choices
        self.message = message
        self.__name__ = "one_of"

    def __repr__(self) -> str:
        args = ", ".join(repr(c) for c in self.choices)
        return f"one_of({args}{f', message={self.message!r}' if self.message else ''})"

    def __call__(self, value: object) -> object:
        choices = self.choices
        if isinstance(value, str):
            low = value.strip().lower()
            for choice in choices:
                if choice.lower() == low:
                    return choice
            listed = f"{value.strip()!r} is not one of: {', '.join(choices)}"
            if self.message:
                raise ValueError(f"{self.message} ({listed})")
            if len(choices) == 2:
                raise ValueError(f"The argument needs to be either '{choices[0]}' or '{choices[1]}'")
            raise ValueError(listed)
        return value


def ticket_secret(value: object) -> object:
    """stunnel's ticket secrets: hex digits, ':' or '-' allowed between bytes, 16 or 32 bytes."""
    text = str(value).replace(":", "").replace("-", "")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise ValueError("not a hex string (e.g. 00112233445566778899aabbccddeeff)") from None
    if len(data) not in (16, 32):
        raise ValueError(f"value has {len(data)} bytes instead of required 16 or 32 bytes")
    return data


LOG_LEVELS = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]
SYSLOG_FACILITIES = [
    "auth", "cron", "daemon", "kern", "lpr", "mail", "news", "syslog", "user", "uucp",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
    "authpriv", "ftp",
]  # fmt: skip


def parse_debug(value: str) -> tuple[str, int]:
    """``debug = [FACILITY.]LEVEL`` with LEVEL 0-7 or a syslog level name."""
    text = value.strip().lower()
    facility = "daemon"
    if "." in text:
        facility, _, text = text.partition(".")
        if facility not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r}")
    if text.isascii() and text.isdigit() and 0 <= int(text) <= 7:  # not int("²")
        return facility, int(text)
    if text in LOG_LEVELS:
        return facility, LOG_LEVELS.index(text)
    # stunnel's words; its names are syslog's own ("err", "warning"), no "error" or "warn"
    raise ValueError(f"Illegal debug level {value.strip()!r}: expected 0-7 or one of {', '.join(LOG_LEVELS)}")


def debug_option(value: object) -> object:
    if isinstance(value, str):
        return parse_debug(value)
    return value


# OpenSSL 3.0 SSL_OP_* values (include/openssl/ssl.h.in).  Zero = obsolete no-op,
# exactly as OpenSSL itself defines them.
SSL_OPTIONS: dict[str, int] = {
    "NO_EXTENDED_MASTER_SECRET": 1 << 0,
    "CLEANSE_PLAINTEXT": 1 << 1,
    "LEGACY_SERVER_CONNECT": 1 << 2,
    "ENABLE_KTLS": 1 << 3,
    "TLSEXT_PADDING": 1 << 4,
    "SAFARI_ECDHE_ECDSA_BUG": 1 << 6,
    "IGNORE_UNEXPECTED_EOF": 1 << 7,
    "ALLOW_CLIENT_RENEGOTIATION": 1 << 8,
    "DISABLE_TLSEXT_CA_NAMES": 1 << 9,
    "ALLOW_NO_DHE_KEX": 1 << 10,
    "DONT_INSERT_EMPTY_FRAGMENTS": 1 << 11,
    "NO_QUERY_MTU": 1 << 12,
    "COOKIE_EXCHANGE": 1 << 13,
    "NO_TICKET": 1 << 14,
    "CISCO_ANYCONNECT": 1 << 15,
    "NO_SESSION_RESUMPTION_ON_RENEGOTIATION": 1 << 16,
    "NO_COMPRESSION": 1 << 17,
    "ALLOW_UNSAFE_LEGACY_RENEGOTIATION": 1 << 18,
    "NO_ENCRYPT_THEN_MAC": 1 << 19,
    "ENABLE_MIDDLEBOX_COMPAT": 1 << 20,
    "PRIORITIZE_CHACHA": 1 << 21,
    "CIPHER_SERVER_PREFERENCE": 1 << 22,
    "TLS_ROLLBACK_BUG": 1 << 23,
    "NO_ANTI_REPLAY": 1 << 24,
    "NO_SSLv3": 1 << 25,
    "NO_TLSv1": 1 << 26,
    "NO_TLSv1_2": 1 << 27,
    "NO_TLSv1_1": 1 << 28,
    "NO_TLSv1_3": 1 << 29,
    "NO_RENEGOTIATION": 1 << 30,
    "CRYPTOPRO_TLSEXT_BUG": 1 << 31,
    "NO_DTLSv1": 1 << 26,
    "NO_DTLSv1_2": 1 << 27,
    # OpenSSL 3's SSL_OP_ALL: the harmless bug workarounds
    "ALL": (1 << 31) | (1 << 11) | (1 << 2) | (1 << 4) | (1 << 6),
    "NO_SSL_MASK": (1 << 25) | (1 << 26) | (1 << 28) | (1 << 27) | (1 << 29),
    "NO_DTLS_MASK": (1 << 26) | (1 << 27),
    "MICROSOFT_SESS_ID_BUG": 0,
    "NETSCAPE_CHALLENGE_BUG": 0,
    "NETSCAPE_REUSE_CIPHER_CHANGE_BUG": 0,
    "SSLREF2_REUSE_CERT_TYPE_BUG": 0,
    "MICROSOFT_BIG_SSLV3_BUFFER": 0,
    "SSLEAY_080_CLIENT_DH_BUG": 0,
    "TLS_D5_BUG": 0,
    "TLS_BLOCK_PADDING_BUG": 0,
    "MSIE_SSLV2_RSA_PADDING": 0,
    "SINGLE_DH_USE": 0,
    "SINGLE_ECDH_USE": 0,
    "EPHEMERAL_RSA": 0,
    "NETSCAPE_CA_DN_BUG": 0,
    "NETSCAPE_DEMO_CIPHER_CHANGE_BUG": 0,
    "NO_SSLv2": 0,
    "PKCS1_CHECK_1": 0,
    "PKCS1_CHECK_2": 0,
}
_OPTION_NAMES = {name.upper(): name for name in SSL_OPTIONS}


def ssl_option(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        neg = text.startswith("-")
        name = text[1:] if neg else text
        canon = _OPTION_NAMES.get(name.upper())
        if canon is None:
            import difflib

            close = difflib.get_close_matches(name.upper(), list(_OPTION_NAMES), n=1)
            hint = f" (did you mean {_OPTION_NAMES[close[0]]}?)" if close else ""
            raise ValueError(f"unknown TLS option {name!r}{hint}; `pytunnel -options` lists them")
        return ("-" if neg else "") + canon
    return value


def socket_option(value: object) -> object:
    if isinstance(value, str):
        return parse_socket_option(value)
    return value


def ip_text(value: object) -> object:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"{value.strip()!r} is not an IP address") from None
    return value


def local_addr(value: object) -> object:
    """``local``: an IP address, or a host name resolved now (stunnel resolves it when it
    reads the file) to its first address."""
    if not isinstance(value, str):
        return value
    try:
        return ip_text(value)
    except ValueError:
        pass
    import socket

    text = value.strip()

    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f'Error resolving "{text}": {exc.strerror or exc}') from None
    return str(infos[0][4][0])


def retry_delay(value: object) -> object:
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "yes":
            return 1000
        if low == "no":
            return 0
        if low.isascii() and low.isdigit():  # not int("²")
            return int(low)
        raise ValueError("expected yes, no or a delay in milliseconds")
    return value


TRANSPARENT_MODES = ("none", "source", "destination", "both")
TRANSPARENT_LEGACY = {"yes": "source", "no": "none"}


def parse_mode(value: object) -> object:
    """The option's value: none|source|destination|both, or legacy yes (source) / no (none).

    Any mode but ``none`` is refused outside Linux, when the configuration is read."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    mode = TRANSPARENT_LEGACY.get(low, low)
    if mode not in TRANSPARENT_MODES:
        raise ValueError(
            "Selected transparent proxy mode is not available: use none, source, destination or both "
            "(legacy: yes = source, no = none)"
        )
    if mode != "none" and not sys.platform.startswith("linux"):
        raise ValueError(
            f"transparent = {mode} is only available on Linux (IP_TRANSPARENT, SO_ORIGINAL_DST); "
            f"this system is {sys.platform}"
        )
    return mode


TLS_VERSIONS = ("all", "SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
tls_version = one_of(*TLS_VERSIONS, message="Invalid protocol version")


def uid_of(user: str) -> int:
    """``setuid``'s value as a number: digits as they are, a name looked up (KeyError when
    this system has no such user)."""
    import pwd

    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def gid_of(group: str) -> int:
    """``setgid``'s value as a number, as :func:`uid_of` (KeyError for an unknown group)."""
    import grp

    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid

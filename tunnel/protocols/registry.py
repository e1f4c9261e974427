"""The ``protocol =`` table: every name stunnel knows, its phases in each mode, and the
checks the configuration makes of it (stunnel's table in its protocol.c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunnel.protocols.cifs import cifs_client_middle, cifs_server_early
from tunnel.protocols.connect import connect_client_middle, connect_server_early
from tunnel.protocols.ldap import ldap_client_middle
from tunnel.protocols.mail import (
    imap_client_middle,
    imap_server_middle,
    nntp_client_middle,
    pop3_client_middle,
    pop3_server_middle,
    smtp_client_late,
    smtp_client_middle,
    smtp_server_middle,
)
from tunnel.protocols.pgsql import pgsql_client_middle, pgsql_server_early
from tunnel.protocols.proxy import proxy_server_late, proxy_v2_server_late
from tunnel.protocols.socks import socks_client_late, socks_server_middle
from tunnel.protocols.tap import Mode

if TYPE_CHECKING:
    from tunnel.settings import ServiceSettings


@dataclass(frozen=True)
class Protocol:
    """One ``protocol =`` name and its phases in client and server mode."""

    name: str
    client: Mode = Mode()
    server: Mode = Mode()


PROTOCOLS: dict[str, Protocol] = {
    "smtp": Protocol(
        "smtp",
        client=Mode(middle=smtp_client_middle, late=smtp_client_late),
        server=Mode(middle=smtp_server_middle, connect_before_tls=True),
    ),
    "pop3": Protocol(
        "pop3",
        client=Mode(middle=pop3_client_middle),
        server=Mode(middle=pop3_server_middle, connect_before_tls=True),
    ),
    "imap": Protocol(
        "imap",
        client=Mode(middle=imap_client_middle),
        server=Mode(middle=imap_server_middle, connect_before_tls=True),
    ),
    "nntp": Protocol("nntp", client=Mode(middle=nntp_client_middle)),
    "ldap": Protocol("ldap", client=Mode(middle=ldap_client_middle)),
    "pgsql": Protocol(
        "pgsql",
        client=Mode(middle=pgsql_client_middle),
        server=Mode(early=pgsql_server_early),
    ),
    "cifs": Protocol("cifs", client=Mode(middle=cifs_client_middle), server=Mode(early=cifs_server_early)),
    "connect": Protocol(
        "connect",
        client=Mode(middle=connect_client_middle),
        server=Mode(early=connect_server_early),
    ),
    "socks": Protocol(
        "socks",
        client=Mode(late=socks_client_late),
        server=Mode(middle=socks_server_middle),
    ),
    "proxy": Protocol("proxy", server=Mode(late=proxy_server_late)),
    "proxy-v2": Protocol("proxy-v2", server=Mode(late=proxy_v2_server_late)),
}

# stunnel's names that cannot exist outside its Windows build
WINDOWS_ONLY = {"capwin", "capwinctrl"}

# protocolAuthentication values each protocol knows (stunnel's defaults first)
AUTHENTICATION: dict[str, tuple[str, ...]] = {"smtp": ("plain", "login"), "connect": ("basic",)}

# values stunnel knows that pytunnel refuses, and why (for the configuration error's hint)
AUTHENTICATION_UNAVAILABLE: dict[str, str] = {
    "ntlm": (
        "NTLM (v1) needs MD4 and single DES, which OpenSSL 3 keeps in its legacy provider "
        "and Python's hashlib no longer offers; use basic (inside a TLS-protected network) instead"
    ),
}


def decides_endpoint(name: str, client: bool) -> bool:
    """True when the protocol picks the upstream itself (SOCKS server): stunnel counts it as
    the section's second endpoint, so such a section has ``accept`` and no ``connect``."""
    return name.lower() == "socks" and not client


def check(settings: ServiceSettings) -> str | None:
    """stunnel's per-protocol init checks (its ``*_init``), for configuration time."""
    name = (settings.protocol or "").lower()
    if name == "connect" and settings.client and not settings.protocolHost:
        return "protocolHost not specified"
    return None


def names(client: bool) -> list[str]:
    return sorted(n for n, p in PROTOCOLS.items() if not (p.client if client else p.server).empty)


def lookup(name: str, client: bool) -> Mode:
    """The phases of ``name`` in this mode; ValueError with stunnel's text when there are none."""
    key = name.lower()
    if key in WINDOWS_ONLY:
        raise ValueError(f"protocol {name} exists only for stunnel's Windows CAPWIN integration")
    proto = PROTOCOLS.get(key)
    if proto is None:
        raise ValueError("Protocol not supported")
    mode = proto.client if client else proto.server
    if mode.empty:
        raise ValueError(
            f"The configured protocol is not supported in the {'client' if client else 'server'} mode"
        )
    return mode

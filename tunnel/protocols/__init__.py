"""``protocol =``: what stunnel says on the wire before (or right after) TLS.

The package's face: the names the rest of pytunnel uses.  Its rooms:

* ``tap``       the framework: :class:`Tap` byte streams over a :class:`Pipe` (a side of
                the connection), :class:`Ctx`, :class:`Mode` (early / middle / late
                phases), :class:`ProtocolError`; it imports nothing of the data path;
* ``mail``, ``ldap``, ``pgsql``, ``cifs``, ``connect``, ``socks``, ``proxy``: one family
  of protocols each, built on ``tap`` only;
* ``registry``  the table of names, :func:`lookup` and the configuration checks.

Protocols (stunnel's table in its protocol.c; c = client mode, s = server mode):

=========  ==========================================================================
smtp       c: STARTTLS (+ AUTH PLAIN/LOGIN after TLS); s: STARTTLS, RFC 2487 detection
pop3       c: STLS; s: STLS (and CAPA) towards the client
imap       c: STARTTLS; s: STARTTLS, RFC 2595 detection, CAPABILITY passed through
nntp       c: STARTTLS
ldap       c: the RFC 2830 StartTLS extended operation (BER)
pgsql      c: SSLRequest; s: SSLRequest, GSSENCRequest refused with an ErrorResponse
cifs       c/s: the NetBIOS "use TLS" session exchange
connect    c: HTTP CONNECT through a proxy (basic auth, extra headers);
           s: answers a CONNECT request and connects where it asked
socks      c: SOCKS5 CONNECT to protocolHost inside TLS; s: SOCKS 4/4a/5 inside TLS
proxy      s: HAProxy PROXY v1 header to the upstream
proxy-v2   s: HAProxy PROXY v2 (binary, with TLS facts as TLVs) -- pytunnel only
=========  ==========================================================================
"""

from tunnel.protocols.registry import (
    AUTHENTICATION,
    AUTHENTICATION_UNAVAILABLE,
    PROTOCOLS,
    WINDOWS_ONLY,
    check,
    decides_endpoint,
    lookup,
    names,
)
from tunnel.protocols.tap import ConnectionView, Ctx, Mode, Phase, Pipe, ProtocolError, Tap, TlsPipe

__all__ = [
    "AUTHENTICATION",
    "AUTHENTICATION_UNAVAILABLE",
    "PROTOCOLS",
    "WINDOWS_ONLY",
    "ConnectionView",
    "Ctx",
    "Mode",
    "Phase",
    "Pipe",
    "ProtocolError",
    "Tap",
    "TlsPipe",
    "check",
    "decides_endpoint",
    "lookup",
    "names",
]

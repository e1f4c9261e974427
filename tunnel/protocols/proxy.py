"""``protocol = proxy`` / ``proxy-v2`` (server mode): the HAProxy PROXY header that tells the
upstream who the client is, v1 in text as stunnel sends it, v2 in binary with the accepted
TLS session's facts as TLVs (pytunnel only).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from tunnel.protocols.tap import Ctx, ProtocolError, TlsPipe, remote_of

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_ALPN = 0x01
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS = 0x01, 0x02, 0x04


def _accepted_addresses(ctx: Ctx) -> tuple[int, Any, Any]:
    """The accepted socket's family, the client's address and the address it reached (those a
    load balancer's PROXY header carried, with ``acceptProxy``)."""
    if ctx.conn.origin is not None:
        return ctx.conn.origin
    transport = ctx.local.side.transport
    if transport is None:
        raise ProtocolError("getpeername: the client socket is gone")
    sock = transport.get_extra_info("socket")
    family = int(sock.family) if sock is not None else socket.AF_UNSPEC
    return family, transport.get_extra_info("peername"), transport.get_extra_info("sockname")


def proxy_v1_header(family: int, peer: Any, local: Any) -> bytes:
    """``PROXY TCP4 src dst sport dport`` (stunnel's proxy_server_late)."""
    if family in (socket.AF_INET, socket.AF_INET6):
        proto = "TCP4" if family == socket.AF_INET else "TCP6"
        return f"PROXY {proto} {peer[0]} {local[0]} {peer[1]} {local[1]}\r\n".encode()
    return b"PROXY UNKNOWN\r\n"  # a Unix socket: no addresses to tell


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def proxy_v2_header(family: int, peer: Any, local: Any, tlvs: bytes = b"") -> bytes:
    """The binary PROXY v2 header: version 2, command PROXY, TCP over IPv4/IPv6 or Unix stream."""
    if family == socket.AF_INET:
        fam = 0x11
        body = socket.inet_pton(family, peer[0]) + socket.inet_pton(family, local[0])
        body += struct.pack("!HH", peer[1], local[1])
    elif family == socket.AF_INET6:
        fam = 0x21
        body = socket.inet_pton(family, str(peer[0]).split("%")[0])
        body += socket.inet_pton(family, str(local[0]).split("%")[0])
        body += struct.pack("!HH", peer[1], local[1])
    elif family == socket.AF_UNIX:
        fam = 0x31
        src = peer.encode() if isinstance(peer, str) else bytes(peer or b"")
        dst = local.encode() if isinstance(local, str) else bytes(local or b"")
        body = src[:108].ljust(108, b"\0") + dst[:108].ljust(108, b"\0")
    else:
        fam, body = 0x00, b""  # AF_UNSPEC: the receiver uses the real connection's addresses
    body += tlvs
    return PROXY_V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def _tls_tlvs(ctx: Ctx) -> bytes:
    """ALPN and PP2_TYPE_SSL (version, cipher, client certificate CN) of the accepted TLS."""
    side = ctx.local.side
    if not isinstance(side, TlsPipe):
        return b""
    sslobj = side.sslobj
    out = b""
    alpn = sslobj.selected_alpn_protocol()
    if alpn:
        out += _tlv(PP2_TYPE_ALPN, alpn.encode())
    der = sslobj.getpeercert(binary_form=True)
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if der else 0)
    # the handshake got here, so a presented certificate passed whatever checks are configured
    verify = 0 if der else 1
    sub = _tlv(PP2_SUBTYPE_SSL_VERSION, (sslobj.version() or "").encode())
    cipher = sslobj.cipher()
    if cipher:
        sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher[0].encode())
    if der:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            names = []
        if names:
            sub += _tlv(PP2_SUBTYPE_SSL_CN, str(names[0].value).encode())
    return out + _tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + sub)


async def proxy_server_late(ctx: Ctx) -> None:
    family, peer, local = _accepted_addresses(ctx)
    remote_of(ctx).write(proxy_v1_header(family, peer, local))


async def proxy_v2_server_late(ctx: Ctx) -> None:
    family, peer, local = _accepted_addresses(ctx)
    remote_of(ctx).write(proxy_v2_header(family, peer, local, _tls_tlvs(ctx)))

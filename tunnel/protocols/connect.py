"""``protocol = connect``: HTTP CONNECT through a proxy (client mode: basic auth, extra
headers) and the proxy's own part (server mode: answer a CONNECT and connect where it asked).
"""

from __future__ import annotations

import base64
import contextlib

from tunnel import STUNNEL_COMPAT_VERSION
from tunnel.addr import parse_endpoint
from tunnel.protocols.tap import Ctx, ProtocolError, Tap, Target, is_prefix, remote_of, resolve


async def _skip_headers(tap: Tap) -> None:
    """Read HTTP header lines up to the empty line that ends them."""
    while await tap.getline():
        pass


def _server_header() -> str:
    return f"Server: stunnel/{STUNNEL_COMPAT_VERSION}"


async def connect_client_middle(ctx: Ctx) -> None:
    remote, s = remote_of(ctx), ctx.settings
    host = s.protocolHost
    if not host:
        raise ProtocolError("protocolHost not specified")
    lines = [f"CONNECT {host} HTTP/1.1", f"Host: {host}"]
    if s.protocolUsername and s.protocolPassword:
        if (s.protocolAuthentication or "basic").lower() == "ntlm":  # conf rejects it first
            raise ProtocolError("NTLM authentication is not available")
        token = base64.b64encode(f"{s.protocolUsername}:{s.protocolPassword}".encode()).decode()
        lines.append(f"Proxy-Authorization: basic {token}")
    lines.extend(s.protocolHeader)  # custom headers, verbatim
    lines.append("")
    remote.write("".join(f"{line}\r\n" for line in lines).encode())
    status = await remote.getline()
    if not (is_prefix(status, "HTTP/1.0 2") or is_prefix(status, "HTTP/1.1 2")):
        ctx.log(6, f"CONNECT reply: {status[:200]}")
        with contextlib.suppress(ProtocolError):
            await _skip_headers(remote)
        raise ProtocolError("CONNECT request rejected")
    ctx.log(6, "CONNECT request accepted")
    await _skip_headers(remote)


async def connect_server_early(ctx: Ctx) -> None:
    local = ctx.local

    def answer(status: str) -> None:
        local.write(f"HTTP/1.0 {status}\r\n{_server_header()}\r\n\r\n".encode())

    request = await local.getline()
    if not is_prefix(request, "CONNECT "):
        answer("400 Bad Request Method")
        raise ProtocolError("CONNECT request expected: 400 Bad Request Method")
    target, space, proto = request[8:].partition(" ")
    if not space or not is_prefix(proto, "HTTP/"):
        answer("400 Bad Request Protocol")
        raise ProtocolError("CONNECT request without HTTP version: 400 Bad Request Protocol")
    await _skip_headers(local)
    targets: list[Target] = []
    try:
        ep = parse_endpoint(target)
    except ValueError:
        ep = None
    if ep is not None and ep.path is None:  # no Unix socket paths from the network
        targets = await resolve(ep.host or "localhost", ep.port)
    if not targets:
        answer("404 Not Found")
        raise ProtocolError(f'CONNECT target "{target[:200]}" not resolved: 404 Not Found')
    ctx.targets = targets
    answer("200 OK")

"""``protocol = socks``: SOCKS5 CONNECT as a client inside TLS (to protocolHost, or to the
address an iptables REDIRECT hid), and a SOCKS 4/4a/5 server inside TLS that tells the
connection where to connect (``Ctx.targets``), refusing this host's loopback as stunnel does.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

from tunnel.addr import original_destination
from tunnel.protocols.tap import Ctx, Pipe, ProtocolError, Target, remote_of, resolve

SOCKS5_ERRORS = {
    0x01: "General SOCKS server failure",
    0x02: "Connection not allowed by ruleset",
    0x03: "Network unreachable",
    0x04: "Host unreachable",
    0x05: "Connection refused",
    0x06: "TTL expired",
    0x07: "Command not supported",
    0x08: "Address type not supported",
}


def _port_number(text: str) -> int | None:
    if text.isascii() and text.isdigit():
        port = int(text)
        return port if port <= 65535 else None
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def _original_dst(side: Pipe) -> tuple[int, str, int]:
    """Where the app meant to go before iptables REDIRECT (stunnel's original_dst)."""
    transport = side.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise ProtocolError("getsockopt SO_ORIGINAL_DST: the client socket is gone", reset=False)
    try:
        family, addr = original_destination(sock)
    except OSError as exc:
        code = exc.errno or errno.ENOENT
        raise ProtocolError(
            f"getsockopt SO_ORIGINAL_DST: {os.strerror(code)} ({code})", reset=False
        ) from None
    return family, str(addr[0]), int(addr[1])


async def socks_client_late(ctx: Ctx) -> None:
    """SOCKS5 over the TLS connection: no authentication, CONNECT to protocolHost."""
    remote = remote_of(ctx)
    remote.write(b"\x05\x01\x00")  # version 5, one method: NO AUTHENTICATION REQUIRED
    version, method = await remote.read_exact(2)
    if version != 5:
        raise ProtocolError(f"Invalid SOCKS5 message version 0x{version:02x}", reset=False)
    if method != 0x00:
        raise ProtocolError("No supported SOCKS5 authentication method received", reset=False)
    target = ctx.settings.protocolHost
    if target:  # explicit destination, sent as a DOMAINNAME
        host, colon, port_text = target.rpartition(":")
        if not colon:
            host, port_text = "localhost", target
        name = host.encode("idna") if not host.isascii() else host.encode()
        if len(name) > 255:
            raise ProtocolError("protocolHost too long", reset=False)
        port = _port_number(port_text)
        if port is None:
            raise ProtocolError(
                f"Invalid port: {port_text} (error: Servname not supported for ai_socktype)", reset=False
            )
        ctx.log(6, "Sending SOCKS5 DOMAINNAME")
        remote.write(bytes([5, 1, 0, 3, len(name)]) + name + port.to_bytes(2, "big"))
    else:  # transparent destination
        family, addr, port = _original_dst(ctx.local.side)
        if family == socket.AF_INET6:
            ctx.log(6, "Sending SOCKS5 IPv6 address")
            remote.write(bytes([5, 1, 0, 4]) + socket.inet_pton(family, addr) + port.to_bytes(2, "big"))
        else:
            ctx.log(6, "Sending SOCKS5 IPv4 address")
            remote.write(bytes([5, 1, 0, 1]) + socket.inet_pton(family, addr) + port.to_bytes(2, "big"))
    head = await remote.read_exact(4)
    if head[3] == 0x04:
        await remote.read_exact(16 + 2)
    elif head[3] == 0x03:  # stunnel reads 6 bytes here and loses sync; read the name
        await remote.read_exact((await remote.read_exact(1))[0] + 2)
    else:
        await remote.read_exact(4 + 2)
    if head[0] != 5:
        raise ProtocolError(f"Invalid SOCKS5 message version 0x{head[0]:02x}", reset=False)
    if head[1] == 0x00:
        ctx.log(6, "SOCKS5 request succeeded")
        return
    text = SOCKS5_ERRORS.get(head[1], f"Unknown error 0x{head[1]:02x}")
    raise ProtocolError(f"SOCKS5 request failed: {text}", reset=False)


def _socks_refusal(targets: list[Target]) -> str | None:
    """stunnel's validate_connect_addr: SOCKS must not reach this host's loopback."""
    for family, addr, _name in targets:
        if family == socket.AF_INET6:
            ip6 = ipaddress.IPv6Address(str(addr[0]).split("%")[0])
            if ip6.is_loopback:
                return "SOCKS connection to the IPv6 loopback rejected"
            mapped = ip6.ipv4_mapped  # ::ffff:127.0.0.1 -- stunnel lets it through
            if mapped is not None and mapped.is_loopback:
                return "SOCKS connection to the IPv4 loopback rejected"
        elif family == socket.AF_INET:
            if ipaddress.IPv4Address(addr[0]).is_loopback:
                return "SOCKS connection to the IPv4 loopback rejected"
        else:
            return f"Unsupported address type 0x{family:02x}"
    return None


async def socks_server_middle(ctx: Ctx) -> None:
    """SOCKS inside TLS: the client names the destination; stunnel answers before connecting."""
    ctx.log(7, "Waiting for the SOCKS request")
    version = (await ctx.local.read_exact(1))[0]
    if version == 4:
        await _socks4_server(ctx)
    elif version == 5:
        await _socks5_method(ctx)
        await _socks5_server(ctx)
    else:
        raise ProtocolError(f"Unsupported SOCKS version 0x{version:02x}")


async def _socks4_server(ctx: Ctx) -> None:
    local = ctx.local
    head = await local.read_exact(7)  # command, port, IPv4 address
    command, port_raw, addr_raw = head[0], head[1:3], head[3:7]
    await local.getstring()  # USERID: ignored
    port = int.from_bytes(port_raw, "big")
    problem: str | None = None
    done: str | None = None  # a RESOLVE answer ends the connection without an error
    if command == 0x01:  # CONNECT
        ip = int.from_bytes(addr_raw, "big")
        if 0 < ip < 256:  # 0.0.0.x: SOCKS4a, a host name follows
            name = (await local.getstring()).decode("latin-1")
            targets = await resolve(name, port)
            if targets:
                ctx.log(6, f'SOCKS4a resolved "{name}" to {len(targets)} host(s)')
                problem = _socks_refusal(targets)
            else:
                problem = f'SOCKS4a failed to resolve "{name}"'
        else:
            targets = [(socket.AF_INET, (socket.inet_ntop(socket.AF_INET, addr_raw), port), None)]
            ctx.log(6, "SOCKS4 address received")
            problem = _socks_refusal(targets)
        if problem is None:
            ctx.targets = targets
    elif command == 0xF0:  # RESOLVE (a Tor extension)
        name = (await local.getstring()).decode("latin-1")
        found = await resolve(name, 0, socket.AF_INET)
        if found:
            addr_raw = socket.inet_pton(socket.AF_INET, found[0][1][0])
            done = f'SOCKS4a/TOR resolved "{name}"'
        else:
            problem = f'SOCKS4a/TOR failed to resolve "{name}"'
    else:
        problem = f"Unsupported SOCKS4/SOCKS4a command 0x{command:02x}"
    granted = problem is None
    local.write(bytes([0, 90 if granted else 91]) + port_raw + addr_raw)
    if problem is not None:
        raise ProtocolError(problem, reset=False)
    if done is not None:
        raise ProtocolError(done, reset=False, level=6)


async def _socks5_method(ctx: Ctx) -> None:
    local = ctx.local
    count = (await local.read_exact(1))[0]
    methods = await local.read_exact(count)
    method = 0x00 if 0x00 in methods else 0xFF  # only NO AUTHENTICATION REQUIRED
    local.write(bytes([5, method]))
    if method:
        raise ProtocolError("No supported SOCKS5 authentication method received", reset=False)


async def _socks5_server(ctx: Ctx) -> None:
    local = ctx.local
    # the answer echoes the request's header and address, as stunnel's shared buffer does
    reply = bytearray(22)
    reply[0:4] = await local.read_exact(4)
    version, command, atyp = reply[0], reply[1], reply[3]
    rep = 0x01
    problem: str | None = None
    done: str | None = None
    targets: list[Target] = []
    if version != 0x05:
        problem = f"Invalid SOCKS5 message version 0x{version:02x}"
        reply[0] = 0x05
    elif command == 0x01:  # CONNECT
        if atyp == 0x01:
            reply[4:10] = await local.read_exact(4 + 2)
            host = socket.inet_ntop(socket.AF_INET, bytes(reply[4:8]))
            targets = [(socket.AF_INET, (host, int.from_bytes(reply[8:10], "big")), None)]
            ctx.log(6, "SOCKS5 IPv4 address received")
        elif atyp == 0x03:
            size = (await local.read_exact(1))[0]
            name = (await local.read_exact(size)).decode("latin-1")
            port = int.from_bytes(await local.read_exact(2), "big")
            targets = await resolve(name, port)
            if targets:
                ctx.log(6, f'SOCKS5 resolved "{name}" to {len(targets)} host(s)')
            else:
                problem, rep = f'SOCKS5 failed to resolve "{name}"', 0x04
        elif atyp == 0x04:
            reply[4:22] = await local.read_exact(16 + 2)
            host = socket.inet_ntop(socket.AF_INET6, bytes(reply[4:20]))
            targets = [(socket.AF_INET6, (host, int.from_bytes(reply[20:22], "big"), 0, 0), None)]
            ctx.log(6, "SOCKS5 IPv6 address received")
        else:
            problem, rep = f"Unsupported SOCKS5 address type 0x{atyp:02x}", 0x07
        if targets:
            problem = _socks_refusal(targets)
            rep = 0x00 if problem is None else 0x02
    elif command == 0xF0:  # RESOLVE (a Tor extension)
        size = (await local.read_exact(1))[0]
        name = (await local.read_exact(size)).decode("latin-1")
        port = int.from_bytes(await local.read_exact(2), "big")
        found = await resolve(name, port)
        if not found:
            problem, rep = f'SOCKS5/TOR failed to resolve "{name}"', 0x04
        elif found[0][0] == socket.AF_INET6:
            reply[3], reply[4:20] = 0x04, socket.inet_pton(socket.AF_INET6, found[0][1][0].split("%")[0])
            done, rep = f'SOCKS5/TOR resolved "{name}" to IPv6', 0x00
        else:
            reply[3], reply[4:8] = 0x01, socket.inet_pton(socket.AF_INET, found[0][1][0])
            done, rep = f'SOCKS5/TOR resolved "{name}" to IPv4', 0x00
    else:
        problem, rep = f"Unsupported SOCKS5 command 0x{command:02x}", 0x07
    reply[1] = rep
    if reply[3] == 0x04:
        local.write(bytes(reply))
    else:
        reply[3] = 0x01
        local.write(bytes(reply[:10]))
    if problem is not None:
        raise ProtocolError(problem, reset=False)
    if done is not None:
        raise ProtocolError(done, reset=False, level=6)
    ctx.targets = targets

"""``protocol = cifs``: the NetBIOS session exchange in which the server says "use TLS"."""

from __future__ import annotations

from tunnel.protocols.tap import Ctx, ProtocolError, remote_of

NB_SESSION_REQUEST = 0x81
NB_NEGATIVE_RESPONSE = 0x83
NB_USE_TLS = 0x8E
NB_ACCESS_DENIED = 0x81


async def cifs_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    remote.write(bytes([NB_SESSION_REQUEST, 0, 0, 0]))  # a zero-length session request
    answer = await remote.read_exact(5)
    if answer[0] != NB_NEGATIVE_RESPONSE:
        raise ProtocolError("Negative response expected")
    if answer[2] != 0 or answer[3] != 1:
        raise ProtocolError("Unexpected NetBIOS response size")
    if answer[4] != NB_USE_TLS:
        raise ProtocolError("Remote server does not require TLS")


async def cifs_server_early(ctx: Ctx) -> None:
    local = ctx.local
    header = await local.read_exact(4)
    size = header[2] << 8 | header[3]
    if size > 124:
        raise ProtocolError("Received block too long")
    await local.read_exact(size)
    if header[0] != NB_SESSION_REQUEST:
        local.write(bytes([NB_NEGATIVE_RESPONSE, 0, 0, 1, NB_ACCESS_DENIED]))
        raise ProtocolError("Client did not send session setup")
    local.write(bytes([NB_NEGATIVE_RESPONSE, 0, 0, 1, NB_USE_TLS]))

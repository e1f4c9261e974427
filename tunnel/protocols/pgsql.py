"""``protocol = pgsql``: PostgreSQL's SSLRequest (client mode) and its answer (server mode)."""

from __future__ import annotations

import struct

from tunnel.protocols.tap import Ctx, ProtocolError, remote_of

PG_SSL_REQUEST = bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F])  # length 8, code 80877103
PG_GSS_REQUEST = bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x30])  # length 8, code 80877104


def _pg_error(fields: list[tuple[str, str]]) -> bytes:
    body = b"".join(code.encode() + text.encode() + b"\0" for code, text in fields) + b"\0"
    return b"E" + struct.pack("!I", 4 + len(body)) + body


# stunnel's canned answer to a GSSENCRequest (an ErrorResponse, then it closes)
PG_GSS_REFUSAL = _pg_error(
    [("S", "ERROR"), ("C", "XX000"), ("M", "SSL expected but not requested by client")]
)


async def pgsql_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    remote.write(PG_SSL_REQUEST)
    if await remote.read_exact(1) != b"S":  # 'N': the server prefers no TLS
        raise ProtocolError("PostgreSQL server rejected TLS")


async def pgsql_server_early(ctx: Ctx) -> None:
    local = ctx.local
    ctx.log(7, "Started server-side psql protocol negotiation")
    request = await local.read_exact(8)
    if request == PG_GSS_REQUEST:
        local.write(PG_GSS_REFUSAL)
        raise ProtocolError("GSSAPI encryption requested, rejecting gracefully", reset=False, level=6)
    if request != PG_SSL_REQUEST:
        # no way to send an error before the startup packet: just drop the client
        raise ProtocolError("PostgreSQL client did not request TLS, rejecting")
    ctx.log(7, "SSLRequest received")
    local.write(b"S")

"""``ident = USER``: ask the client host's identd (RFC 1413) who owns the connection.

stunnel asks before the TLS handshake and the "accepted connection" line; a client whose
identd names another user (or cannot be asked) is refused with stunnel's words.  A leaf but for
the close reasons.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from tunnel.reasons import CloseReason


class Asker(Protocol):
    """The connection being asked about: its address for the refusal line, its log and end."""

    @property
    def peer_addr(self) -> str: ...
    def log(self, level: int, text: str, **fields: object) -> None: ...
    def fail(self, reason: CloseReason, detail: str, *, rst: bool | None = None, level: int = 3) -> None: ...


class IdentSettings(Protocol):
    @property
    def ident(self) -> str | None: ...
    @property
    def TIMEOUTconnect(self) -> int: ...  # noqa: N802 - stunnel's spelling


async def ask_ident(conn: Asker, settings: IdentSettings, transport: Any) -> bool:
    """True when identd on the client's host names ``settings.ident``; otherwise the
    connection is failed (IDENT_REFUSED) and False."""
    want = settings.ident
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        conn.fail(CloseReason.IDENT_REFUSED, "IDENT: the client is not on TCP")
        return False
    user = ""
    try:
        async with asyncio.timeout(float(settings.TIMEOUTconnect)):
            reader, writer = await asyncio.open_connection(peer[0], 113)
            try:
                writer.write(f"{peer[1]} , {local[1]}\r\n".encode())
                line = (await reader.readline()).decode("latin-1").strip()
            finally:
                writer.close()
        fields = [f.strip() for f in line.split(":")]
        if len(fields) >= 4 and fields[1].upper() == "USERID":
            user = ":".join(fields[3:]).strip()
        else:
            conn.fail(CloseReason.IDENT_REFUSED, f"Incorrect data from IDENT server: {line[:200]!r}")
            return False
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) and not exc.errno else exc.strerror or str(exc)
        conn.fail(CloseReason.IDENT_REFUSED, f"IDENT: cannot ask {peer[0]}:113: {why}")
        return False
    conn.log(7, f"IDENT resolved remote user to {user}")
    if user != want:
        text = f'Connection from {conn.peer_addr} REFUSED by IDENT (user "{user}")'
        conn.fail(CloseReason.IDENT_REFUSED, text, level=4)
        return False
    conn.log(6, "IDENT authentication passed")
    return True

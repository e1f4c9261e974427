"""The narrow views the data path (``tunnel/relay.py``) has of the rest of pytunnel: its owner, the
limits it reads from a service's settings and a ``protocol =`` negotiation's tap; and the one read
buffer its sides share.  A leaf."""

from __future__ import annotations

import asyncio
import errno
from typing import Any, Protocol, TypeGuard

READ_BUFFER = 262144  # what uvloop reads at once for a plain Protocol
_BUFFER = memoryview(bytearray(READ_BUFFER))


class SharedBuffer(asyncio.BufferedProtocol):
    """The event loop reads into one buffer shared by every side (no fresh ``bytes`` per read):
    ``data_received`` gets a view of it and must consume it, or copy what it keeps, at once."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError


class Limits(Protocol):
    """The options the data path reads (a service's settings have them)."""

    @property
    def TIMEOUTidle(self) -> int: ...  # noqa: N802 - stunnel's spelling
    @property
    def TIMEOUTclose(self) -> int: ...  # noqa: N802
    @property
    def reset(self) -> bool: ...


class Tap(Protocol):
    """A ``protocol =`` negotiation reading a side's bytes before the relay does."""

    def feed(self, data: bytes) -> None: ...
    def feed_eof(self) -> None: ...


class Owner(Protocol):
    """Whoever opened a connection: its limits, where its lines go, who hears that it ended
    (``conn`` is the relay's ``Connection``)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Limits: ...
    def log_conn(
        self, level: int, conn_id: str, text: str, fields: dict[str, object] | None = None
    ) -> None: ...
    def connection_ended(self, conn: Any) -> None: ...


def not_connected(exc: Exception | None) -> TypeGuard[OSError]:
    """ENOTCONN: write_eof on a socket the peer already reset."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOTCONN

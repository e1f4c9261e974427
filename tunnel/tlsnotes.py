"""What one TLS handshake leaves behind for the data path: the notes OpenSSL's callbacks
write, the slot they write them into, and OpenSSL's reason text for a failure.

A leaf: it imports nothing from tunnel, so the data path (relay.py) can use it without
importing the context builders (tls.py) or the option models (settings.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass
class Notes:
    """What OpenSSL's callbacks learn during one connection's handshake."""

    psk_identity: str | None = None  # the PSK identity offered (server) or sent (client)
    psk_known: bool = False  # server: the identity was found in PSKsecrets
    # (reason, depth, DER at that depth) of each verification failure: redirect lets them pass
    verify_errors: list[tuple[str, int, bytes]] | None = None


class _Slot:
    """The notes of the connection whose ``do_handshake()`` is running right now.

    OpenSSL's callbacks receive no Python object of ours; a handshake step runs to its
    end on the event loop's thread, so this one slot is enough (each worker is a process).
    """

    notes: Notes | None = None


SLOT = _Slot()


def reason_of(exc: BaseException) -> str:
    """OpenSSL's reason text where there is one (tools grep for it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return reason.replace("_", " ").lower() if reason.isupper() else reason
    return str(exc) or type(exc).__name__

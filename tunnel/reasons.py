"""The closed vocabularies of how a connection ends and why a handshake failed.

Every connection ends with exactly one :class:`CloseReason`; every refused or failed TLS
handshake is counted under exactly one :class:`HandshakeFailure`.  The summary line, the JSON
log, ``/metrics`` and the tests key on these members, and the label lists in
``docs/metrics.md`` are generated from them (``tools/gen_options_table.py``), so a new reason
cannot reach the metrics without reaching the documentation.  A leaf: imports nothing.
"""

from __future__ import annotations

import enum


class CloseReason(enum.Enum):
    """How a connection ended.  ``value`` is the summary line's word; ``label`` the metric's."""

    CLOSED = "closed"  # both directions ended cleanly (or TIMEOUTclose after one did)
    PEER_RESET = "peer reset"  # a TCP reset (or broken pipe) from either end
    IDLE_TIMEOUT = "idle timeout"  # TIMEOUTidle with both directions open
    CONNECT_FAILED = "connect failed"  # no upstream could be reached (or exec failed)
    HANDSHAKE_FAILED = "handshake failed"  # the TLS handshake failed or outlived TIMEOUTbusy
    VERIFY_FAILED = "verify failed"  # the peer's certificate was refused (chain, check*, OCSP)
    PROTOCOL_FAILED = "protocol failed"  # a ``protocol =`` negotiation failed
    IDENT_REFUSED = "ident refused"  # ``ident = USER``: identd named another user, or no answer
    PROXY_HEADER = "proxy header"  # ``acceptProxy``: PROXY header missing, malformed, oversized, slow
    TLS_ERROR = "tls error"  # a TLS record error or alert after the handshake
    SOCKET_ERROR = "socket error"  # a socket error other than a reset
    SHUTDOWN = "shutdown"  # the process stopped (drain deadline, second signal)
    INTERNAL_ERROR = "internal error"  # a bug: an exception escaped a connection's opening

    @property
    def label(self) -> str:
        return self.name.lower()


class HandshakeFailure(enum.Enum):
    """Why a TLS handshake did not lead to a relayed connection; ``value`` is the metric label."""

    VERIFY_FAILED = "verify_failed"  # certificate chain or check* refused
    PROTOCOL_ERROR = "protocol_error"  # a TLS alert or malformed handshake
    PEER_CLOSED = "peer_closed"  # the peer closed the TCP connection mid-handshake
    PEER_RESET = "peer_reset"  # the peer reset the TCP connection mid-handshake
    TIMEOUT = "timeout"  # TIMEOUTbusy ran out
    REDIRECTED = "redirected"  # verification failed and ``redirect`` took the client elsewhere
    OCSP = "ocsp"  # an OCSP responder said revoked or unknown, or could not be asked
    URI_MISMATCH = "uri_mismatch"  # checkURI (with any other check*): no URI SAN matched
    NO_APPLICATION_PROTOCOL = "no_application_protocol"  # alpn: the client offered none of ours

    @property
    def label(self) -> str:
        return self.value

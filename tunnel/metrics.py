"""Process-wide counters behind ``/metrics``: plain integers, no Prometheus import.

The data path never touches a metrics library.  It adds to these counters once per
connection (close reason, byte totals, handshake time) and the status server turns them
into Prometheus families at scrape time (``tunnel/health.py``).  Bytes of live
connections are read from the connections themselves at scrape time, so
``pytunnel_bytes_total`` moves while a long transfer runs, at no cost per read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tunnel.reasons import CloseReason, HandshakeFailure

# handshake durations, seconds (Prometheus' default buckets, from 1 ms)
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: further counter families (``Stats.count``): name -> (help, label names); /metrics shows each
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pytunnel_tls_handshakes": (
        "TLS handshakes completed, by key exchange group (unknown: OpenSSL could not say)",
        ("service", "group"),
    ),
    "pytunnel_acme_renewals": (
        "ACME certificate orders (first issue and renewals), by result",
        ("service", "result"),
    ),
    "pytunnel_ocsp_staple_fetches": (
        "OCSP stapling: a server's fetches of its own OCSP response, by result (good, revoked, failure)",
        ("service", "result"),
    ),
}


@dataclass
class ServiceStats:
    """Counters of one service name; they survive a reload (a new Service, same name)."""

    closed: dict[str, int] = field(default_factory=dict)  # close reason -> connections
    to_tls: int = 0  # bytes of ended connections
    to_plain: int = 0
    handshake_failures: dict[str, int] = field(default_factory=dict)  # reason -> count
    limited: int = 0  # clients that waited in the backlog for a slot under maxConnections

    def limited_one(self) -> None:
        self.limited += 1

    def ended(self, reason: CloseReason, to_tls: int, to_plain: int) -> None:
        label = reason.label
        self.closed[label] = self.closed.get(label, 0) + 1
        self.to_tls += to_tls
        self.to_plain += to_plain

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        label = reason.value
        self.handshake_failures[label] = self.handshake_failures.get(label, 0) + 1


@dataclass
class Stats:
    services: dict[str, ServiceStats] = field(default_factory=dict)
    handshake_buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    handshake_sum: float = 0.0
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    # (service, certificate file) -> notAfter as a Unix time
    cert_not_after: dict[tuple[str, str], float] = field(default_factory=dict)
    # (family, label values) -> count, for the families in FAMILIES
    counters: dict[tuple[str, tuple[str, ...]], int] = field(default_factory=dict)

    def service(self, name: str) -> ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats()
        return stats

    def observe_handshake(self, seconds: float) -> None:
        self.handshake_buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.handshake_sum += seconds

    def count(self, family: str, *labels: str) -> None:
        key = (family, labels)
        self.counters[key] = self.counters.get(key, 0) + 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1


STATS = Stats()

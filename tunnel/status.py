"""The status server (``--status HOST:PORT``): ``/livez``, ``/readyz`` and ``/metrics``.

It runs on the tunnel's own event loop and answers one request per connection
(HTTP/1.1 with ``Connection: close``).  ``prometheus_client`` is imported off the
loop when the server starts, so neither start-up nor the first scrape waits for it;
metric values come from ``tunnel.metrics.STATS`` and the live connections at
scrape time (nothing is counted per byte).

It never sees the server itself: the server hands it a ``snapshot()`` callable that
returns plain data, built by :func:`snapshot` from the narrow views below (``Served``:
a name, listeners, live connections).  A worker sends the same data to its supervisor,
which merges the workers' snapshots (:func:`merge`).  :func:`probe` is the client side:
``pytunnel healthcheck``.  This module imports nothing above addr, logs and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Protocol

from tunnel import __version__
from tunnel.addr import format_sockaddr, parse_endpoint
from tunnel.logs import log
from tunnel.metrics import BUCKETS, FAMILIES, STATS

DEFAULT_PORT = 9102
REQUEST_TIMEOUT = 5.0
MAX_HEADER_LINES = 100


def parse_status(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` (loopback) -> (host, port); ValueError with a fix."""
    ep = parse_endpoint(value)
    if ep.path is not None:
        raise ValueError(
            f"{value!r}: the status server listens on TCP (expected HOST:PORT, e.g. 127.0.0.1:9102)"
        )
    return ep.host or "127.0.0.1", ep.port


Snapshot = dict[str, Any]  # plain data (JSON-able, summable): see `snapshot`


class StatusServer:
    """Serves what ``snapshot()`` says; the server that owns it builds the snapshot."""

    def __init__(self, address: str, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot
        self.host, self.port = parse_status(address)
        self.server: asyncio.Server | None = None
        self.sock: socket.socket | None = None
        self.started = time.time()
        self._prom: Any = None
        self._loading: asyncio.Future[Any] | None = None

    def bind(self) -> None:
        """Bind before privileges are dropped, as the services' listeners are.  Raises OSError."""
        family, stype, proto, _, addr = socket.getaddrinfo(
            self.host, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock

    async def start(self) -> str:
        assert self.sock is not None
        self.server = await asyncio.start_server(self._serve, sock=self.sock)
        bound = format_sockaddr(self.sock.getsockname())
        log.ui(5, f"Status server listening on http://{bound} (/livez /readyz /metrics)")
        if self._prom is None:
            loop = asyncio.get_running_loop()
            self._loading = loop.run_in_executor(None, _load_prometheus)
        return bound

    def preload(self) -> None:
        """Import prometheus_client now (before chroot / setuid), not in the background."""
        self._prom = _load_prometheus()

    def address(self) -> str:
        return format_sockaddr(self.sock.getsockname()) if self.sock is not None else ""

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        elif self.sock is not None:
            self.sock.close()

    # ---- HTTP -----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
                for _ in range(MAX_HEADER_LINES):
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
            writer.write(http_response(request, *await self._answer(request)))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, request: bytes) -> tuple[str, str, bytes]:
        target = request_target(request)
        if isinstance(target, tuple):
            return target
        if target == "/livez":
            return "200 OK", "text/plain", b"ok\n"
        if target == "/readyz":
            return readyz(self.snapshot())
        if target == "/metrics":
            prom = await self._prometheus()
            return metrics(prom, self.snapshot())
        return NOT_FOUND

    # ---- metrics --------------------------------------------------------------------
    async def _prometheus(self) -> Any:
        if self._prom is None:
            assert self._loading is not None
            self._prom = await self._loading
        return self._prom


class _Prom:
    """The parts of prometheus_client we use, imported together off the loop."""

    def __init__(self) -> None:
        self.core = importlib.import_module("prometheus_client.core")
        self.registry = importlib.import_module("prometheus_client.registry")
        self.exposition = importlib.import_module("prometheus_client.exposition")
        self.process_collector = importlib.import_module("prometheus_client.process_collector")


def _load_prometheus() -> _Prom:
    return _Prom()


load_prometheus = _load_prometheus


Answer = tuple[str, str, bytes]  # status line, content type, body
NOT_FOUND: Answer = ("404 Not Found", "text/plain", b"try /livez, /readyz or /metrics\n")


def request_target(request: bytes) -> str | Answer:
    """The path of a GET or HEAD request line (query dropped), or the error to answer."""
    parts = request.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", "text/plain", b"bad request\n"
    if parts[0] not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"GET or HEAD\n"
    return parts[1].split("?", 1)[0]


def http_response(request: bytes, status: str, ctype: str, body: bytes) -> bytes:
    head = request.split(b" ", 1)[0] == b"HEAD"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
    ) + (b"" if head else body)


# ---- snapshots: one process's figures, mergeable across workers ------------------------
def _row(
    closed: dict[str, int] | None = None,
    to_tls: int = 0,
    to_plain: int = 0,
    failures: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One service's figures in a snapshot (ended connections' counts; live ones added later)."""
    return {
        "closed": closed or {},
        "to_tls": to_tls,
        "to_plain": to_plain,
        "active": 0,
        "handshake_failures": failures or {},
        "listening": [],
        "limited": 0,
        "cap": 0,
    }


class Counted(Protocol):
    """A live connection, as a snapshot reads it."""

    @property
    def to_tls(self) -> int: ...
    @property
    def to_sock(self) -> int: ...


class Shown(Protocol):
    """A listening socket, as a snapshot names it."""

    @property
    def display(self) -> str: ...


class Accepting(Protocol):
    """A service's settings, as far as a snapshot looks: does it have accept lines?"""

    @property
    def accept(self) -> Sequence[object]: ...
    @property
    def maxConnections(self) -> int: ...  # noqa: N802 - stunnel-style spelling


class Served(Protocol):
    """A service, as far as a snapshot looks: its name, listeners and live connections."""

    @property
    def name(self) -> str: ...
    @property
    def connections(self) -> Collection[Counted]: ...
    @property
    def listeners(self) -> Sequence[Shown]: ...
    @property
    def settings(self) -> Accepting: ...


def snapshot(ready: bool, draining: bool, current: Sequence[Served], everyone: Sequence[Served]) -> Snapshot:
    """Everything /readyz and /metrics show, as plain data (JSON-able, summable).

    ``current``: the services of the configuration in use; ``everyone``: those plus the
    ones a reload retired whose connections go on."""
    services: dict[str, dict[str, Any]] = {}
    for name, stats in STATS.services.items():
        services[name] = _row(
            dict(stats.closed), stats.to_tls, stats.to_plain, dict(stats.handshake_failures)
        )
        services[name]["limited"] = stats.limited
    for service in everyone:
        row = services.setdefault(service.name, _row())
        for conn in service.connections:
            row["active"] += 1
            row["to_tls"] += conn.to_tls
            row["to_plain"] += conn.to_sock
    for service in current:
        services[service.name]["listening"] = [lst.display for lst in service.listeners]
        services[service.name]["accepts"] = bool(service.settings.accept)
        services[service.name]["cap"] = service.settings.maxConnections
    return {
        "ready": ready and not draining,
        "draining": draining,
        "current": [s.name for s in current],
        "services": services,
        "handshake_buckets": list(STATS.handshake_buckets),
        "handshake_sum": STATS.handshake_sum,
        "reloads": dict(STATS.reloads),
        "cert_not_after": [[svc, path, value] for (svc, path), value in STATS.cert_not_after.items()],
        "counters": [[family, list(labels), n] for (family, labels), n in STATS.counters.items()],
    }


def merge(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' snapshots as one: counts summed, ready only when every worker is."""
    out: dict[str, Any] = {
        "ready": bool(snaps) and all(s["ready"] for s in snaps),
        "draining": any(s["draining"] for s in snaps),
        "current": snaps[0]["current"] if snaps else [],
        "services": {},
        "handshake_buckets": [0] * (len(BUCKETS) + 1),
        "handshake_sum": 0.0,
        "reloads": {},
        "cert_not_after": snaps[0]["cert_not_after"] if snaps else [],
        "counters": _sum_counters(snaps),
    }
    for snap in snaps:
        for name, row in snap["services"].items():
            acc = out["services"].setdefault(name, _row())
            for key in ("to_tls", "to_plain", "active", "limited", "cap"):
                acc[key] += row.get(key, 0)  # each worker has its own cap: theirs add up
            for key in ("closed", "handshake_failures"):
                for reason, count in row[key].items():
                    acc[key][reason] = acc[key].get(reason, 0) + count
            acc["listening"] = sorted(set(acc["listening"]) | set(row["listening"]))
            if "accepts" in row:
                acc["accepts"] = row["accepts"]
        out["handshake_buckets"] = [
            a + b for a, b in zip(out["handshake_buckets"], snap["handshake_buckets"], strict=True)
        ]
        out["handshake_sum"] += snap["handshake_sum"]
        for result, count in snap["reloads"].items():
            out["reloads"][result] = out["reloads"].get(result, 0) + count
    return out


def _sum_counters(snaps: list[dict[str, Any]]) -> list[list[Any]]:
    total: dict[tuple[str, tuple[str, ...]], int] = {}
    for snap in snaps:
        for family, labels, n in snap.get("counters", []):
            key = (family, tuple(labels))
            total[key] = total.get(key, 0) + n
    return [[family, list(labels), n] for (family, labels), n in total.items()]


def readyz(snap: dict[str, Any], workers: int | None = None) -> tuple[str, str, bytes]:
    current = [snap["services"][n] | {"name": n} for n in snap["current"] if n in snap["services"]]
    listening = all(row["listening"] for row in current if row.get("accepts", True))
    ready = bool(snap["ready"]) and listening
    doc: dict[str, Any] = {
        "ready": ready,
        "draining": snap["draining"],
        "listening": listening,
        "active": sum(row["active"] for row in snap["services"].values()),
        "services": [
            {"name": r["name"], "listening": r["listening"], "active": r["active"]} for r in current
        ],
    }
    if workers is not None:
        doc["workers"] = workers
    body = json.dumps(doc, indent=1).encode() + b"\n"
    return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body


def metrics(prom: Any, snap: dict[str, Any]) -> tuple[str, str, bytes]:
    registry = prom.registry.CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap, prom))
    prom.process_collector.ProcessCollector(registry=registry)
    return "200 OK", prom.exposition.CONTENT_TYPE_LATEST, prom.exposition.generate_latest(registry)


class _Collector:
    def __init__(self, snap: dict[str, Any], prom: Any) -> None:
        self.snap = snap
        self.core = prom.core

    def collect(self) -> Iterator[Any]:
        core = self.core
        snap = self.snap
        info = core.GaugeMetricFamily("pytunnel_info", "pytunnel's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        ready = core.GaugeMetricFamily("pytunnel_ready", "1 while accepting connections and not draining")
        ready.add_metric([], 1 if snap["ready"] else 0)
        yield ready

        total = core.CounterMetricFamily(
            "pytunnel_connections", "Connections ended, by close reason", labels=["service", "reason"]
        )
        active = core.GaugeMetricFamily(
            "pytunnel_connections_active", "Connections open now", labels=["service"]
        )
        nbytes = core.CounterMetricFamily(
            "pytunnel_bytes",
            "Bytes relayed: to_tls = written into TLS, to_plain = written to the plain side",
            labels=["service", "direction"],
        )
        failures = core.CounterMetricFamily(
            "pytunnel_handshake_failures",
            "TLS handshakes that failed, by reason",
            labels=["service", "reason"],
        )
        for name, row in sorted(snap["services"].items()):
            for reason, count in sorted(row["closed"].items()):
                total.add_metric([name, reason], count)
            active.add_metric([name], row["active"])
            nbytes.add_metric([name, "to_tls"], row["to_tls"])
            nbytes.add_metric([name, "to_plain"], row["to_plain"])
            for reason, count in sorted(row["handshake_failures"].items()):
                failures.add_metric([name, reason], count)
        yield from (total, active, nbytes, failures)
        yield from _cap_families(core, snap)

        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), snap["handshake_buckets"], strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        hist = core.HistogramMetricFamily(
            "pytunnel_handshake_seconds", "Time from TCP accept/connect to a verified TLS handshake"
        )
        hist.add_metric([], buckets, sum_value=snap["handshake_sum"])
        yield hist

        cert = core.GaugeMetricFamily(
            "pytunnel_cert_not_after_seconds",
            "Expiry (notAfter, Unix time) of each certificate in use",
            labels=["service", "cert"],
        )
        for svc_name, path, value in sorted(snap["cert_not_after"]):
            cert.add_metric([svc_name, path], value)
        yield cert
        reloads = core.CounterMetricFamily(
            "pytunnel_reloads", "Configuration and certificate reloads, by result", labels=["result"]
        )
        for result, count in sorted(snap["reloads"].items()):
            reloads.add_metric([result], count)
        yield reloads
        for family, (text, names) in FAMILIES.items():
            counter = core.CounterMetricFamily(family, text, labels=list(names))
            for name, labels, n in sorted(snap.get("counters", [])):
                if name == family:
                    counter.add_metric(labels, n)
            yield counter


def _cap_families(core: Any, snap: dict[str, Any]) -> Iterator[Any]:
    """maxConnections: the cap of each capped service, and the clients that waited for it."""
    limited = core.CounterMetricFamily(
        "pytunnel_connections_limited",
        "Clients that waited in the backlog because the service was at maxConnections",
        labels=["service"],
    )
    cap = core.GaugeMetricFamily(
        "pytunnel_connections_max", "maxConnections of the service (summed over workers)", labels=["service"]
    )
    for name, row in sorted(snap["services"].items()):
        if row.get("cap") or row.get("limited"):
            limited.add_metric([name], row.get("limited", 0))
        if row.get("cap"):
            cap.add_metric([name], row["cap"])
    yield from (limited, cap)


def probe(address: str, path: str = "/livez", timeout: float = 3.0) -> tuple[bool, str]:
    """`pytunnel healthcheck`: (healthy, one line saying why)."""
    import urllib.error
    import urllib.request

    host, port = parse_status(address)
    if host == "0.0.0.0":  # noqa: S104 - listening everywhere: ask loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{shown}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http to our own port
            return resp.status == 200, f"{url}: {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"

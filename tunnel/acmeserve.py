"""ACME's moving parts around tunnel/acme.py: the challenge responders, the first certificate
at start-up (and on a reload), and the background renewals.

* :class:`Responder` (one per order): what must be answered now.  ``tls-alpn-01``: the
  challenge certificates are published as files and answered inside the ALPN callback of
  every context of the service (tunnel/acmealpn.py: only a client offering ``acme-tls/1``
  sees one); the opening closes a handshake that negotiated ``acme-tls/1`` without dialing.
  ``http-01``: a small HTTP server on ``ACMEhttp`` while an order runs.
* :func:`first_certificates`: at start, before any port is bound, each ACME service without a
  usable stored certificate (or with one that no longer fits its ACMEdomain/ACMEdirectory)
  obtains one; the ``tls-alpn-01`` answers come from a temporary TLS listener on the
  service's accept addresses.  Exit status 3 past ``ACMEtimeout``.  :func:`before_reload`
  does the same for an ACME service a SIGHUP brings, answering on the live ports.
* :class:`Renewals`: one asyncio task per ACME service, following reloads
  (:meth:`Renewals.update`); the order runs in a thread (the ``acme`` library is
  synchronous); the new file is picked up by the certificate watcher of every process.
  With ``--workers N`` only worker 0 runs them (``Server.orders_acme``).

Imports acme, acmealpn, addr, settings, metrics, logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel import acme, acmealpn
from tunnel.addr import Endpoint
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.settings import ServiceSettings

BACKOFF_FIRST, BACKOFF_MAX = 5.0, 3600.0


@dataclass
class Responder:
    """What must be answered while one service's order runs: tls-alpn-01 certificates are
    published as files (tunnel/acmealpn.py, seen by every process); http-01 answers here."""

    svc: ServiceSettings
    http: dict[str, str] = field(default_factory=dict)  # token -> key authorization
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answers(self) -> acme.Answers:
        return acme.Answers(tls_alpn=self._set_tls, http=self._set_http, clear=self._clear)

    def _set_tls(self, domain: str, pem: bytes) -> None:
        acmealpn.publish(self.svc, domain, pem)

    def _set_http(self, token: str, key_authz: str) -> None:
        with self.lock:
            self.http[token] = key_authz

    def _clear(self) -> None:
        with self.lock:
            self.http.clear()
        acmealpn.clear(self.svc)


_ORDERING: dict[str, threading.Lock] = {}  # one order at a time per service (a reload may overlap)


def _order(svc: ServiceSettings, answers: acme.Answers, deadline: float) -> Path:
    with _ORDERING.setdefault(svc.name, threading.Lock()):
        return acme.obtain(svc, answers, deadline)


def install(ctx: ssl.SSLContext, svc: ServiceSettings) -> None:
    """Answer tls-alpn-01 on this (live) context of an ACME service."""
    acmealpn.install(ctx, svc, svc.alpn)


# ---- temporary listeners ------------------------------------------------------------------
def _bind(host: str | None, port: int) -> socket.socket:
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))  # noqa: S104
    sock.listen(16)
    sock.settimeout(0.2)
    return sock


def _placeholder(svc: ServiceSettings) -> ssl.SSLContext:
    """The temporary responder's context: a throwaway P-256 certificate (the type of the
    challenge's, so TLS 1.2 picks a suite that fits it) and the tls-alpn-01 callback."""
    base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    base.minimum_version = ssl.TLSVersion.TLSv1_2
    fd, tmp = tempfile.mkstemp(prefix=".pytunnel-acme-", dir=acme.state_dir(svc))
    try:
        os.write(fd, acme.alpn_challenge_cert("placeholder.invalid", "placeholder"))
        os.close(fd)
        base.load_cert_chain(tmp)
    finally:
        os.unlink(tmp)
    acmealpn.install(base, svc, None)
    return base


def _serve_tls(sock: socket.socket, base: ssl.SSLContext, stop: threading.Event) -> None:
    """Answer validation handshakes until ``stop``; nothing else is served."""
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with contextlib.suppress(OSError, ssl.SSLError), conn:
            conn.settimeout(10)
            with base.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # the validator closes once it has seen the certificate


def _http_handler(rsp: Responder) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            prefix = "/.well-known/acme-challenge/"
            answer = rsp.http.get(self.path[len(prefix) :]) if self.path.startswith(prefix) else None
            body = (answer or "not found").encode()
            self.send_response(200 if answer else 404)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silent
            return

    return Handler


@contextlib.contextmanager
def responders(svc: ServiceSettings, tls_ports: bool, held: Collection[Endpoint] = ()) -> Iterator[Responder]:
    """The temporary listeners an order needs: ``tls_ports`` (before the service binds) the
    accept addresses for tls-alpn-01, but those in ``held`` (already listening, answered by
    the live context); for http-01 the ACMEhttp address."""
    rsp = Responder(svc)
    acme.private_dir(acme.state_dir(svc).parent)
    acme.private_dir(acme.state_dir(svc))
    rsp.answers().clear()  # what an order cut short left behind
    stop = threading.Event()
    threads: list[threading.Thread] = []
    closers: list[Callable[[], None]] = []
    try:
        if svc.ACMEchallenge == "http-01" and svc.ACMEhttp is not None:
            addr = svc.ACMEhttp
            server = http.server.ThreadingHTTPServer((addr.host or "0.0.0.0", addr.port), _http_handler(rsp))  # noqa: S104
            threads.append(threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True))
            closers.append(server.shutdown)
            closers.append(server.server_close)
        elif tls_ports:
            base = _placeholder(svc)
            for ep in svc.accept:
                if ep.is_unix or ep in held:
                    continue
                sock = _bind(ep.host, ep.port)
                threads.append(threading.Thread(target=_serve_tls, args=(sock, base, stop), daemon=True))
                closers.append(sock.close)
        for t in threads:
            t.start()
        yield rsp
    finally:
        stop.set()
        for close in closers:
            with contextlib.suppress(OSError):
                close()
        for t in threads:
            t.join(timeout=5)


# ---- the first certificate -------------------------------------------------------------------
def first_certificates(services: list[ServiceSettings], held: Collection[Endpoint] = ()) -> str | None:
    """Obtain what is missing before anything binds (or, on a reload, binds anew: ``held``
    addresses are listening already); None, or the line to exit 3 with."""
    for svc in services:
        if not svc.ACMEdirectory:
            continue
        path = acme.cert_path(svc)
        stale = acme.stale(svc) if acme.usable(path) else "no certificate"
        if stale is None:
            log.ui(5, f"Service [{svc.name}]: ACME certificate loaded from {path}")
            continue
        if stale != "no certificate":
            log.ui(5, f"Service [{svc.name}]: ACME: the stored certificate is replaced: {stale}")
        log.ui(5, f"Service [{svc.name}]: ACME: ordering a certificate for {', '.join(svc.ACMEdomain)}")
        start = time.monotonic()
        deadline = start + float(svc.ACMEtimeout)
        try:
            with responders(svc, tls_ports=True, held=held) as rsp:
                _order(svc, rsp.answers(), deadline)
        except (acme.AcmeError, OSError) as exc:
            STATS.count("pytunnel_acme_renewals", svc.name, "failure")
            return (
                f"Service [{svc.name}]: ACME: no certificate from {svc.ACMEdirectory} "
                f"within {svc.ACMEtimeout} s: {exc}"
            )
        STATS.count("pytunnel_acme_renewals", svc.name, "success")
        log.ui(
            5, f"Service [{svc.name}]: ACME certificate obtained in {time.monotonic() - start:.1f} s: {path}"
        )
    return None


# ---- renewals --------------------------------------------------------------------------------
async def before_reload(
    services: list[ServiceSettings], orders: bool, live: dict[Endpoint, tuple[ssl.SSLContext, str | None]]
) -> str | None:
    """A reload brings an ACME service without a usable certificate (a new one, or one that
    just turned ACME on): its first certificate, before the reload builds it, so it never
    serves a placeholder.  ``live``: the contexts listening now, by address; those on the
    service's accept addresses answer tls-alpn-01 meanwhile.  A process that does not order
    (``--workers``: all but worker 0) waits for the file worker 0 stores.  None, or why the
    reload must fail."""
    for svc in services:
        path = acme.cert_path(svc)
        if not svc.ACMEdirectory or acme.usable(path):
            continue
        if svc.ACMEchallenge == "tls-alpn-01":  # in every process: any may be asked
            for ep in svc.accept:
                if ep in live:
                    acmealpn.install(live[ep][0], svc, live[ep][1])
        if not orders:
            deadline = time.monotonic() + float(svc.ACMEtimeout) + 10
            while not acme.usable(path):
                if time.monotonic() > deadline:
                    return f"Service [{svc.name}]: ACME: no certificate stored in {path} within {svc.ACMEtimeout} s"
                await asyncio.sleep(0.5)
            continue
        failed = await asyncio.to_thread(first_certificates, [svc], set(live))
        if failed is not None:
            return failed
    return None


def _acme_key(svc: ServiceSettings) -> tuple[object, ...]:
    """What a renewal task depends on: a reload that changes any of it restarts the task."""
    return (
        svc.ACMEdirectory,
        tuple(svc.ACMEdomain),
        svc.ACMEemail,
        svc.ACMECAfile,
        svc.ACMEchallenge,
        str(svc.ACMEhttp),
        svc.ACMEdir,
        svc.ACMEtimeout,
    )


class Renewals:
    """One task per ACME service: sleep until due, renew, back off on failure.
    :meth:`update` (start, and each reload) makes the tasks follow the options."""

    def __init__(self) -> None:
        self.tasks: dict[str, tuple[tuple[object, ...], asyncio.Task[None]]] = {}

    def update(self, services: list[ServiceSettings]) -> None:
        """Start a task for each ACME service; restart one whose ACME options changed; stop
        the tasks of services that are gone or no longer use ACME."""
        loop = asyncio.get_running_loop()
        wanted = {s.name: s for s in services if s.ACMEdirectory}
        for name, (key, task) in list(self.tasks.items()):
            if name not in wanted or _acme_key(wanted[name]) != key:
                task.cancel()
                del self.tasks[name]
                why = "removed" if name not in wanted else "changed"
                log.ui(6, f"Service [{name}]: ACME renewal stopped (the service's ACME options {why})")
        for name, svc in wanted.items():
            if name not in self.tasks:
                self.tasks[name] = (_acme_key(svc), loop.create_task(self._run(svc)))

    def stop(self) -> None:
        for _key, task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    async def _due(self, svc: ServiceSettings) -> float:
        stale = await asyncio.to_thread(acme.stale, svc)
        if stale is not None:
            log.ui(5, f"Service [{svc.name}]: ACME: ordering a new certificate now: {stale}")
            return time.time()
        path = acme.cert_path(svc)
        due = acme.renew_at(path) or time.time()
        advised = await asyncio.to_thread(acme.ari_renew_at, svc, path)
        return min(due, advised) if advised is not None else due

    async def _run(self, svc: ServiceSettings) -> None:
        failures = 0
        while True:
            wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)) if failures else 0.0
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                wait = await self._due(svc) - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            deadline = time.monotonic() + float(svc.ACMEtimeout)
            try:
                with responders(svc, tls_ports=False) as rsp:
                    await asyncio.to_thread(_order, svc, rsp.answers(), deadline)
            except (acme.AcmeError, OSError) as exc:
                failures += 1
                STATS.count("pytunnel_acme_renewals", svc.name, "failure")
                retry = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
                log.ui(4, f"Service [{svc.name}]: ACME renewal failed (retry in {retry:.0f} s): {exc}")
                continue
            failures = 0
            STATS.count("pytunnel_acme_renewals", svc.name, "success")
            span = acme.validity(acme.cert_path(svc))
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(span[1])) if span else "?"
            log.ui(5, f"Service [{svc.name}]: ACME certificate renewed (valid until {until} UTC)")


def as_built(svc: ServiceSettings) -> ServiceSettings:
    """``pytunnel check`` before the first start: a throwaway certificate stands in for the
    one ACME will issue, so every other TLS option is still checked."""
    path = acme.cert_path(svc)
    if acme.validity(path) is not None:
        return acme.prepare(svc)
    fd, tmp = tempfile.mkstemp(prefix="pytunnel-acme-check-", suffix=".pem")
    os.write(fd, acme.alpn_challenge_cert(svc.ACMEdomain[0] if svc.ACMEdomain else "localhost", "check"))
    os.close(fd)
    import atexit

    atexit.register(lambda: Path(tmp).unlink(missing_ok=True))
    return svc.model_copy(update={"cert": tmp, "key": None})

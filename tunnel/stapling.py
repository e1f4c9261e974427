"""OCSP stapling, the server's side: a service whose certificate names an OCSP responder
(AIA) sends clients that ask (status_request) the responder's answer about it.

Theory of operation
===================

stunnel 5.71+ staples by default, from its server status callback: it serves a cached
response, or asks the responder right there, inside the handshake, and caches the answer
until its ``nextUpdate``.  pytunnel never asks inside a handshake.  One :class:`Stapler`
per server context (per service, per (re)load) holds the response to send, and a task of
its own, started with the service, keeps it fresh:

* It asks the certificate's AIA OCSP URLs in order (as stunnel's ``check_aia``), with no
  nonce, bounded by ``TIMEOUTocsp``, and checks the answer as stunnel does
  (``OCSP_TRUSTOTHER``: a responder found in the service's own chain needs no further
  trust; a delegated one must chain to the issuer or to CAfile).
* A definitive answer (good or revoked; stunnel staples both, the client decides) is kept
  until its ``nextUpdate`` (without one, :data:`NO_NEXT_UPDATE_TTL`) and asked again
  half-way there.  A failure is retried with a backoff from :data:`RETRY_FIRST` to
  :data:`RETRY_MAX` seconds, while the last good answer is served until it runs out.
* The status callback (tunnel/osslconn.py) only reads :meth:`Stapler.current`: a copy of
  the cached DER, or nothing (the extension is not acknowledged, the handshake goes on).
  A handshake before the first answer, or while the responder is down, gets no staple and
  is never delayed.
* A certificate or SIGHUP reload makes a new Stapler; it starts with the last answer about
  the same certificate and issuer while that is still valid.

No knob turns it off: stunnel 5.71+ has none either (a certificate without an AIA OCSP URL
is the way).  PSK services do not staple, as in stunnel.

Imports ocsp, ocsphttp, ocspverify, ocspcache (a constant) and metrics; tls calls :func:`prepare`,
the service starts and stops the task, the sandbox asks :func:`responder_ports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp

from tunnel.metrics import STATS
from tunnel.ocsp import aia_urls
from tunnel.ocspcache import DEFAULT_TTL
from tunnel.ocsphttp import HttpError, http_post, parse_url
from tunnel.ocspverify import Answer, Log, Status, find_issuer, inconclusive, oneline, validate

NO_NEXT_UPDATE_TTL = DEFAULT_TTL  # seconds an answer without nextUpdate is stapled
RETRY_FIRST = 2.0  # seconds before the first retry after a failed fetch
RETRY_MAX = 300.0  # the longest wait between retries
REFRESH_FLOOR = 1.0  # never ask more often than this
# the last answer per (service, certificate, issuer): a SIGHUP reload's new Stapler starts
# with it instead of a gap without a staple
_LAST: dict[tuple[str, bytes, bytes], Staple] = {}


@dataclass(frozen=True)
class Staple:
    der: bytes
    status: Status
    expires: float  # time.time() after which it is not stapled any more


def _quiet(level: int, text: str) -> None:
    pass


class Stapler:
    """One server context's stapled response and the task that keeps it fresh."""

    def __init__(
        self,
        service: str,
        chain: Sequence[x509.Certificate],
        anchors: Sequence[x509.Certificate],
        urls: Sequence[str],
        timeout: float,
    ) -> None:
        self.service = service
        self.chain = list(chain)  # leaf, its issuer, ... (and the root, if known)
        self.anchors = list(anchors)
        self.urls = list(urls)
        self.timeout = timeout
        self.staple: Staple | None = None
        self.failures = 0
        self.say: Log = _quiet
        self._task: asyncio.Task[None] | None = None
        last = _LAST.get((service, *self.key))
        if last is not None and time.time() < last.expires:
            self.staple = last

    @property
    def key(self) -> tuple[bytes, bytes]:
        """What an answer is about: the certificate and its issuer."""
        return (
            self.chain[0].fingerprint(hashes.SHA256()),
            self.chain[1].fingerprint(hashes.SHA256()),
        )

    # ---- the handshake's side: never blocks -------------------------------------------
    def current(self) -> bytes | None:
        """The DER response to staple now, or None (called from the status callback)."""
        staple = self.staple
        if staple is None or time.time() >= staple.expires:
            return None
        return staple.der

    # ---- the task ---------------------------------------------------------------------
    def start(self, say: Log) -> None:
        """Start fetching on the running loop (again after :meth:`stop`)."""
        self.say = say
        if self._task is None or self._task.done():
            say(7, "OCSP: Server OCSP stapling enabled")
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def adopt(self, old: Stapler | None) -> None:
        """After a reload: keep the previous answer if it is about the same certificate."""
        if old is not None and old.staple is not None and old.key == self.key and self.staple is None:
            self.staple = old.staple

    async def _run(self) -> None:
        staple = self.staple
        if staple is not None:  # adopted: ask again half-way to its end
            await asyncio.sleep(max(REFRESH_FLOOR, (staple.expires - time.time()) / 2))
        while True:
            await asyncio.sleep(await self.refresh())

    async def refresh(self) -> float:
        """Ask the responders once; the seconds until the next attempt."""
        answer, der = await self.fetch()
        now = time.time()
        ttl = NO_NEXT_UPDATE_TTL if answer.ttl is None else answer.ttl
        where = f"Service [{self.service}]"
        if answer.status is Status.UNKNOWN or ttl <= 0 or der is None:
            STATS.count("pytunnel_ocsp_staple_fetches", self.service, "failure")
            self.failures += 1
            delay: float = min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(self.failures - 1, 16))
            why = answer.reason if answer.status is Status.UNKNOWN else "the response is out of date"
            kept = self.current() is not None
            self.say(
                4,
                f"OCSP stapling: {where}: no new response ({why}); "
                f"{'the previous one is stapled until it runs out' if kept else 'nothing to staple'}; "
                f"next attempt in {delay:g} s",
            )
            return delay
        STATS.count("pytunnel_ocsp_staple_fetches", self.service, answer.status.value)
        self.failures = 0
        self.staple = _LAST[(self.service, *self.key)] = Staple(der, answer.status, now + ttl)
        self.say(7, "OCSP: Response cached")
        self.say(
            5,
            f"OCSP stapling: {where}: {answer.status.value} response for "
            f"{oneline(self.chain[0].subject)} stapled for {ttl:.0f} s",
        )
        return max(REFRESH_FLOOR, ttl / 2)

    async def fetch(self) -> tuple[Answer, bytes | None]:
        """The first definitive answer of the AIA URLs in order, with its DER."""
        reasons: list[str] = []
        for url in self.urls:
            self.say(5, f'OCSP: Connecting the AIA responder "{url}"')
            answer, der = await self._ask(url)
            if answer.status is not Status.UNKNOWN:
                return answer, der
            reasons.append(answer.reason)
        return Answer(Status.UNKNOWN, "; ".join(dict.fromkeys(reasons)) or "no responder URL"), None

    async def _ask(self, url: str) -> tuple[Answer, bytes | None]:
        say = self.say
        cert, issuer = self.chain[0], self.chain[1]
        try:
            host, port, path, host_header = parse_url(url)
        except ValueError as exc:
            return inconclusive(say, f"bad responder URL {url!r}: {exc}"), None
        request = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        body = request.public_bytes(serialization.Encoding.DER)
        try:
            async with asyncio.timeout(self.timeout):
                der = await http_post(host, port, path, host_header, body, say)
        except TimeoutError:
            return inconclusive(say, f"responder timed out: {url} (TIMEOUTocsp = {self.timeout:g})"), None
        except HttpError as exc:
            return inconclusive(say, f"bad HTTP response from {url}: {exc}"), None
        except OSError as exc:
            return inconclusive(say, f"responder unreachable: {url}: {exc.strerror or exc}"), None
        say(7, "OCSP: Response received")
        answer = validate(der, request, None, cert, self.chain, self.anchors, frozenset({"TRUSTOTHER"}), say)
        return answer, der


def prepare(
    service: str, cert_pem: bytes, trust: Sequence[x509.Certificate], timeout: float
) -> Stapler | None:
    """A Stapler for a server certificate file (PEM: the leaf, then its chain), or None
    when its leaf names no OCSP responder or its issuer is nowhere to be found (the chain
    in ``cert``, then CAfile), as stunnel then sends no staple either."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return None
    if not certs:
        return None
    leaf = certs[0]
    urls = aia_urls(leaf)
    if not urls:
        return None
    chain = [leaf, *certs[1:]]
    issuer = find_issuer(leaf, [*certs[1:], *trust])
    if issuer is None:
        return None
    if len(chain) < 2 or chain[1] != issuer:
        chain.insert(1, issuer)
    top = chain[-1]
    if top.subject != top.issuer:  # ocsp_params_append_root_ca
        with contextlib.suppress(Exception):
            root = find_issuer(top, trust)
            if root is not None:
                chain.append(root)
    # the service's own chain is what it presents: trusted for checking its own staple
    anchors = [*trust, *chain[1:]]
    return Stapler(service, chain, anchors, urls, timeout)


def responder_ports(cert_path: str) -> set[int]:
    """The TCP ports of the OCSP responders a server certificate (PEM) names: the Landlock
    sandbox lets the process connect to them (tunnel/sandbox.py)."""
    try:
        with open(cert_path, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
        return {parse_url(url)[1] for url in aia_urls(certs[0])} if certs else set()
    except (OSError, ValueError):
        return set()


__all__ = ["Staple", "Stapler", "prepare", "responder_ports"]

"""OCSP checks (tunnel/ocsp.py) against real responders.

The main cases ask OpenSSL's own responder (``openssl ocsp -index ... -port 0``) about
certificates from a throwaway PKI built here, with an OpenSSL CA database (index.txt)
listing good and revoked serials.  Hostile and broken responders (garbage, huge bodies,
silence, replayed or forged answers) are small Python servers on 127.0.0.1.  Every case
asserts the exact outcome: ``None`` (accepted) or the reason's wording."""

from __future__ import annotations

import asyncio
import datetime
import random
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import need_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from loopback_support import Listener
from ocsp_support import NOW, Pki, _der, _key_pem, _pem, build_pki

from tunnel.ocsp import (
    OcspPolicy,
    check_chain,
    check_flags,
    check_url,
    flag_notes,
    verified_chain,
)
from tunnel.ocspcache import ResponseCache


@pytest.fixture(autouse=True)
def _openssl() -> None:
    """The openssl command is the OCSP responder here (.ci/run installs it)."""
    need_tool("openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield from build_pki(tmp_path_factory)


# ------------------------------------------------------------------ Python responders


def http_ok(body: bytes) -> bytes:
    head = (
        f"HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class FakeResponder(Listener):
    """A threaded HTTP server on 127.0.0.1: ``respond(request DER)`` gives the raw bytes to
    send back, or ``None`` to say nothing and hold the connection open."""

    def __init__(self, respond: Callable[[bytes], bytes | None], delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self._closed = threading.Event()
        super().__init__(backlog=64)
        self.url = f"http://127.0.0.1:{self.port}/ocsp"

    def handle(self, conn: Any) -> None:
        self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(body) < length:
                    body += conn.recv(65536)
                answer = self.respond(body)
                if answer is None:
                    self._closed.wait(30)
                    return
                time.sleep(self.delay)
                conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        super().close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeResponder]]:
    made: list[FakeResponder] = []

    def make(respond: Callable[[bytes], bytes | None], delay: float = 0.0) -> FakeResponder:
        server = FakeResponder(respond, delay)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def fetch_real(url: str, cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A genuine response from the openssl responder (no nonce), to replay later."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    request = urllib.request.Request(
        url,
        data=req.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return bytes(resp.read())


def bad_signature(pki: Pki) -> bytes:
    """A genuine response with one bit of its signature (not of an embedded certificate) flipped."""
    genuine = bytearray(fetch_real(pki.url["ca"], pki.leaf_good, pki.root))
    signature = ocsp.load_der_ocsp_response(bytes(genuine)).signature
    at = bytes(genuine).index(signature)
    genuine[at + 10] ^= 0x01  # inside r of the ECDSA (r, s)
    return bytes(genuine)


def forge(
    pki: Pki,
    request_der: bytes,
    *,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
    nonce: bytes | None | bool = True,  # True: echo the request's nonce
    serial_delta: int = 0,
) -> bytes:
    """A response signed by the root (the issuer), saying good, with the given times."""
    req = ocsp.load_der_ocsp_request(request_der)
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            req.issuer_name_hash,
            req.issuer_key_hash,
            req.serial_number + serial_delta,
            req.hash_algorithm,
            ocsp.OCSPCertStatus.GOOD,
            this_update or NOW - datetime.timedelta(minutes=1),
            next_update,
            None,
            None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, pki.root)
    )
    if nonce is True:
        try:
            echoed = req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            builder = builder.add_extension(x509.OCSPNonce(echoed), critical=False)
        except x509.ExtensionNotFound:
            pass
    elif isinstance(nonce, bytes):
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(pki.root_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# ------------------------------------------------------------------ helpers


@dataclass
class Outcome:
    reason: str | None
    lines: list[tuple[int, str]]

    @property
    def log(self) -> str:
        return "\n".join(text for _, text in self.lines)


def check(
    chain: list[x509.Certificate],
    pki: Pki,
    cache: ResponseCache | None = None,
    **policy: object,
) -> Outcome:
    lines: list[tuple[int, str]] = []
    pol = OcspPolicy(trust=(pki.root,), **policy)  # type: ignore[arg-type]
    reason = asyncio.run(
        check_chain(
            [_der(c) for c in chain],
            pol,
            log=lambda lvl, text: lines.append((lvl, text)),
            cache=ResponseCache() if cache is None else cache,
        )
    )
    return Outcome(reason, lines)


# ------------------------------------------------------------------ the answers


def test_good_certificate_accepted_via_aia(pki: Pki) -> None:
    out = check([pki.leaf_good, pki.root], pki, aia=True)
    assert out.reason is None
    assert f'OCSP: Connecting the AIA responder "{pki.url["ca"]}"' in out.log
    assert "OCSP: Certificate accepted" in out.log
    assert "OCSP: Accepted (good)" in out.log


@pytest.mark.parametrize("require", [True, False])
def test_revoked_certificate_rejected_whatever_ocsprequire(pki: Pki, require: bool) -> None:
    out = check([pki.leaf_revoked, pki.root], pki, aia=True, require=require)
    assert (
        out.reason
        == "OCSP: certificate revoked: 1: keyCompromise (depth=0: O=pytunnel test, CN=revoked.example)"
    )
    assert "OCSP: Rejected (revoked)" in out.log
    assert "Rejected by OCSP at depth=0: O=pytunnel test, CN=revoked.example" in out.log


def test_unknown_certificate_needs_ocsprequire_no(pki: Pki) -> None:
    strict = check([pki.leaf_unknown, pki.root], pki, aia=True)
    assert strict.reason is not None
    assert strict.reason.startswith("OCSP: status unknown")
    assert strict.reason.endswith("(depth=0: O=pytunnel test, CN=unknown.example)")
    assert "OCSP: Rejected (OCSPrequire = yes)" in strict.log
    lax = check([pki.leaf_unknown, pki.root], pki, aia=True, require=False)
    assert lax.reason is None
    assert "OCSP: Accepted (OCSPrequire = no)" in lax.log


def test_responder_down(pki: Pki) -> None:
    strict = check([pki.leaf_good, pki.root], pki, url=pki.dead_url)
    assert strict.reason is not None
    assert strict.reason.startswith(f"OCSP: responder unreachable: {pki.dead_url}: ")
    assert check([pki.leaf_good, pki.root], pki, url=pki.dead_url, require=False).reason is None


def test_configured_url_is_asked_before_aia(pki: Pki) -> None:
    # the AIA URL is dead, but the configured responder answers definitively first
    out = check([pki.leaf_dead_aia, pki.root], pki, url=pki.url["ca"], aia=True)
    assert out.reason is None
    assert f'OCSP: Connecting the configured responder "{pki.url["ca"]}"' in out.log
    assert "Connecting the AIA responder" not in out.log


def test_aia_is_the_fallback_when_the_configured_url_fails(pki: Pki) -> None:
    out = check([pki.leaf_good, pki.root], pki, url=pki.dead_url, aia=True)
    assert out.reason is None
    assert out.log.index("Connecting the configured responder") < out.log.index(
        "Connecting the AIA responder"
    )
    # without OCSPaia the dead configured responder is all there is
    assert check([pki.leaf_good, pki.root], pki, url=pki.dead_url).reason is not None


def test_aia_url_not_used_without_ocspaia(pki: Pki) -> None:
    out = check([pki.leaf_dead_aia, pki.root], pki, url=pki.url["ca"], aia=False)
    assert out.reason is None
    assert out.log.count("Connecting the") == 1


def test_certificate_without_aia_is_not_checked(pki: Pki) -> None:
    # stunnel: no URL applies, so no request is made and the certificate is accepted
    out = check([pki.leaf_no_aia, pki.root], pki, aia=True)
    assert out.reason is None
    assert "OCSP: No AIA responder URL" in out.log
    assert "Connecting" not in out.log


def test_intermediates_are_checked_too_but_not_the_root(pki: Pki) -> None:
    out = check([pki.leaf2, pki.inter, pki.root], pki, aia=True)
    assert out.reason is None
    assert f'Connecting the AIA responder "{pki.url["inter"]}"' in out.log  # leaf2
    assert f'Connecting the AIA responder "{pki.url["ca"]}"' in out.log  # the intermediate
    assert out.log.count("OCSP: Accepted (good)") == 2


def test_revoked_intermediate_rejects_the_chain(pki: Pki) -> None:
    out = check([pki.leaf3, pki.inter_revoked, pki.root], pki, aia=True)
    assert out.reason == "OCSP: certificate revoked (depth=1: O=pytunnel test, CN=Revoked Intermediate)"


def test_configured_url_only_checks_the_leaf(pki: Pki) -> None:
    out = check([pki.leaf2, pki.inter, pki.root], pki, url=pki.url["inter"])
    assert out.reason is None
    assert out.log.count("Connecting the") == 1


def test_missing_root_is_taken_from_the_trusted_certificates(pki: Pki) -> None:
    # a chain without its root: the root comes from CAfile, so the leaf is still checked
    assert check([pki.leaf_good], pki, aia=True).reason is None
    revoked = check([pki.leaf_revoked], pki, aia=True).reason
    assert revoked is not None and revoked.startswith("OCSP: certificate revoked")


# ------------------------------------------------------------------ nonces


def test_nonce_echoed_by_openssl(pki: Pki) -> None:
    assert check([pki.leaf_good, pki.root], pki, aia=True, nonce=True).reason is None


def test_replayed_response_is_refused_only_with_ocspnonce(
    pki: Pki, fake: Callable[..., FakeResponder]
) -> None:
    genuine = fetch_real(pki.url["ca"], pki.leaf_good, pki.root)
    server = fake(lambda _req: http_ok(genuine))
    assert check([pki.leaf_good, pki.root], pki, url=server.url).reason is None
    out = check([pki.leaf_good, pki.root], pki, url=server.url, nonce=True)
    assert out.reason == (
        "OCSP: nonce missing from the response (OCSPnonce = yes) (depth=0: O=pytunnel test, CN=good.example)"
    )


def test_wrong_nonce(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda req: http_ok(forge(pki, req, nonce=b"y" * 16)))
    out = check([pki.leaf_good, pki.root], pki, url=server.url, nonce=True)
    assert out.reason == "OCSP: nonce mismatch (depth=0: O=pytunnel test, CN=good.example)"
    echo = fake(lambda req: http_ok(forge(pki, req)))
    assert check([pki.leaf_good, pki.root], pki, url=echo.url, nonce=True).reason is None


# ------------------------------------------------------------------ who may sign


def test_delegated_responder(pki: Pki) -> None:
    out = check([pki.leaf_good, pki.root], pki, url=pki.url["deleg"])
    assert out.reason is None
    revoked = check([pki.leaf_revoked, pki.root], pki, url=pki.url["deleg"]).reason
    assert revoked is not None and revoked.startswith("OCSP: certificate revoked: 1: keyCompromise")
    # NOINTERN: the delegated certificate travels only inside the response
    nointern = check(
        [pki.leaf_good, pki.root], pki, url=pki.url["deleg"], flags=frozenset({"NOINTERN"})
    ).reason
    assert nointern is not None
    assert nointern.startswith("OCSP: signer certificate not found")


def test_responder_without_ocsp_signing_usage(pki: Pki) -> None:
    out = check([pki.leaf_good, pki.root], pki, url=pki.url["noeku"])
    assert out.reason is not None
    assert out.reason.startswith(
        "OCSP: responder not authorized: delegated responder certificate lacks OCSP signing usage"
    )
    assert (
        check([pki.leaf_good, pki.root], pki, url=pki.url["noeku"], flags=frozenset({"nochecks"})).reason
        is None
    )


def test_responder_of_another_ca_is_not_authorized(pki: Pki) -> None:
    # the root's responder is trusted, but leaf2 was issued by the intermediate
    out = check([pki.leaf2, pki.inter, pki.root], pki, url=pki.url["ca"])
    assert out.reason == (
        "OCSP: responder not authorized: neither the issuer nor a delegated responder of the issuer"
        " (depth=0: O=pytunnel test, CN=leaf2.example)"
    )


def test_rogue_responder(pki: Pki) -> None:
    out = check([pki.leaf_good, pki.root], pki, url=pki.url["rogue"])
    assert out.reason is not None
    assert out.reason.startswith("OCSP: responder certificate not trusted: ")
    # with require = no the forged answer is merely inconclusive; a forged "revoked" would not reject
    assert check([pki.leaf_good, pki.root], pki, url=pki.url["rogue"], require=False).reason is None
    # NOVERIFY accepts any signer, as in OpenSSL
    assert (
        check([pki.leaf_good, pki.root], pki, url=pki.url["rogue"], flags=frozenset({"NOVERIFY"})).reason
        is None
    )


def test_bad_signature(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda _req: http_ok(bad_signature(pki)))
    out = check([pki.leaf_good, pki.root], pki, url=server.url)
    assert out.reason is not None
    assert out.reason.startswith("OCSP: bad response signature")
    assert check([pki.leaf_good, pki.root], pki, url=server.url, flags=frozenset({"NOSIGS"})).reason is None


# ------------------------------------------------------------------ stale and broken answers


def test_expired_response(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    old = NOW - datetime.timedelta(days=2)
    server = fake(
        lambda req: http_ok(forge(pki, req, this_update=old, next_update=old + datetime.timedelta(days=1)))
    )
    out = check([pki.leaf_good, pki.root], pki, url=server.url)
    assert (
        out.reason
        == "OCSP: response expired (nextUpdate in the past) (depth=0: O=pytunnel test, CN=good.example)"
    )
    assert check([pki.leaf_good, pki.root], pki, url=server.url, require=False).reason is None


def test_response_from_the_future(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda req: http_ok(forge(pki, req, this_update=NOW + datetime.timedelta(hours=1))))
    reason = check([pki.leaf_good, pki.root], pki, url=server.url).reason
    assert reason is not None and reason.startswith("OCSP: response not yet valid")


def test_response_about_another_certificate(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda req: http_ok(forge(pki, req, serial_delta=1)))
    reason = check([pki.leaf_good, pki.root], pki, url=server.url).reason
    assert reason is not None and reason.startswith("OCSP: no status for this certificate in the response")


def test_responder_error_status(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    busy = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
    server = fake(lambda _req: http_ok(busy.public_bytes(serialization.Encoding.DER)))
    reason = check([pki.leaf_good, pki.root], pki, url=server.url).reason
    assert reason == "OCSP: responder error: 3: tryLater (depth=0: O=pytunnel test, CN=good.example)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhello world", "bad response: not a DER-encoded OCSP response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "bad HTTP response from {url}: not an HTTP status line: b'SSH-2.0-OpenSSH_9.6'"),
        (b"HTTP/1.0 500 Internal Server Error\r\n\r\n", "bad HTTP response from {url}: HTTP status 500 Internal Server Error"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 104857600\r\n\r\n", "bad HTTP response from {url}: response too large (104857600 bytes"),
        (b"HTTP/1.0 200 OK\r\n\r\n" + b"\x30" * (2 << 20), "bad HTTP response from {url}: response too large (over 1048576 bytes)"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n" + b"0" * 10, "bad HTTP response from {url}: response too large"),
        (b"", "bad HTTP response from {url}: connection closed without a response"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\nshort", "bad HTTP response from {url}: truncated body (5 of 100 bytes)"),
        (b"HTTP/1.0 200 OK\r\nX-Junk: " + b"a" * 100_000 + b"\r\n\r\n", "bad HTTP response from {url}: malformed response"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: -1\r\n\r\n", "bad HTTP response from {url}: bad Content-Length: '-1'"),
    ],
    ids=["not-der", "not-http", "http-500", "huge-length", "huge-stream", "huge-chunk", "empty", "truncated", "long-header", "bad-length"],
)  # fmt: skip
def test_garbage_from_the_responder(
    pki: Pki, fake: Callable[..., FakeResponder], raw: bytes, expected: str
) -> None:
    server = fake(lambda _req: raw)
    out = check([pki.leaf_good, pki.root], pki, url=server.url)
    assert out.reason is not None
    assert out.reason.startswith("OCSP: " + expected.format(url=server.url)), out.reason
    assert check([pki.leaf_good, pki.root], pki, url=server.url, require=False).reason is None


def test_mangled_responses_never_escape(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    """Bit flips, truncations and splices of a genuine response: every outcome is an
    acceptance (the flip hit something unsigned and unused) or an "OCSP: ..." reason."""
    rng = random.Random(6960)
    genuine = fetch_real(pki.url["deleg"], pki.leaf_good, pki.root)  # RSA-signed, with the signer cert
    variants: list[bytes] = []
    for i in range(150):
        data = bytearray(genuine)
        if i % 3 == 0:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif i % 3 == 1:
            del data[rng.randrange(len(data)) :]
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 40))
        variants.append(bytes(data))
    feed = iter(variants)
    server = fake(lambda _req: http_ok(next(feed)))
    cache = ResponseCache(default_ttl=0)
    policy = OcspPolicy(url=server.url, trust=(pki.root,))
    chain = [_der(pki.leaf_good), _der(pki.root)]

    async def run_all() -> list[str | None]:
        return [await check_chain(chain, policy, cache=cache) for _ in variants]

    outcomes = asyncio.run(run_all())
    reasons = [r for r in outcomes if r is not None]
    assert len(reasons) > 100
    assert all(r.startswith("OCSP: ") and "internal error" not in r for r in reasons), [
        r for r in reasons if "internal error" in r or not r.startswith("OCSP: ")
    ]


def test_chunked_response_is_decoded(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    def chunked(req: bytes) -> bytes:
        body = forge(pki, req)
        half = len(body) // 2
        parts = [body[:half], body[half:]]
        encoded = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + encoded

    server = fake(chunked)
    assert check([pki.leaf_good, pki.root], pki, url=server.url).reason is None


def test_silent_responder_times_out(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda _req: None)
    started = time.monotonic()
    out = check([pki.leaf_good, pki.root], pki, url=server.url, timeout=0.3)
    assert time.monotonic() - started < 2
    assert out.reason == (
        f"OCSP: responder timed out: {server.url}: no answer within 0.3 s (TIMEOUTocsp)"
        " (depth=0: O=pytunnel test, CN=good.example)"
    )
    assert check([pki.leaf_good, pki.root], pki, url=server.url, timeout=0.3, require=False).reason is None


def test_https_responder_url(pki: Pki) -> None:
    reason = check([pki.leaf_good, pki.root], pki, url="https://127.0.0.1:1/").reason
    assert reason is not None and reason.startswith(
        "OCSP: bad responder URL 'https://127.0.0.1:1/': TLS not supported"
    )
    assert check_url("https://ocsp.example/") is not None
    assert check_url("ftp://ocsp.example/") == "OCSP = ftp://ocsp.example/: expected an http:// URL"
    assert check_url("http://ocsp.example:99999/") is not None
    assert check_url("http://ocsp.example") is None
    assert check_url("http://[::1]:8080/ocsp?x=1") is None


# ------------------------------------------------------------------ caching


def test_good_answers_are_cached_until_next_update(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    genuine = fetch_real(pki.url["ca"], pki.leaf_good, pki.root)  # -nmin 60: nextUpdate in an hour
    server = fake(lambda _req: http_ok(genuine))
    cache = ResponseCache()
    assert check([pki.leaf_good, pki.root], pki, cache, url=server.url).reason is None
    again = check([pki.leaf_good, pki.root], pki, cache, url=server.url)
    assert again.reason is None
    assert "OCSP: Use the cached OCSP response (good)" in again.log
    assert server.connections == 1
    # another policy (here: different flags) does not reuse what this one verified
    assert (
        check([pki.leaf_good, pki.root], pki, cache, url=server.url, flags=frozenset({"NOCHAIN"})).reason
        is None
    )
    assert server.connections == 2


def test_concurrent_lookups_share_one_request(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    genuine = fetch_real(pki.url["ca"], pki.leaf_good, pki.root)
    server = fake(lambda _req: http_ok(genuine), delay=0.2)
    cache = ResponseCache()
    policy = OcspPolicy(url=server.url, trust=(pki.root,))
    chain = [_der(pki.leaf_good), _der(pki.root)]

    async def many() -> list[str | None]:
        return await asyncio.gather(*(check_chain(chain, policy, cache=cache) for _ in range(5)))

    assert asyncio.run(many()) == [None] * 5
    assert server.connections == 1


def test_inconclusive_answers_are_not_cached(pki: Pki, fake: Callable[..., FakeResponder]) -> None:
    server = fake(lambda _req: b"HTTP/1.0 503 Busy\r\n\r\n")
    cache = ResponseCache()
    for _ in range(2):
        assert check([pki.leaf_good, pki.root], pki, cache, url=server.url).reason is not None
    assert server.connections == 2
    assert len(cache) == 0


def test_answer_verified_leniently_is_not_reused_by_a_strict_policy(
    pki: Pki, fake: Callable[..., FakeResponder]
) -> None:
    server = fake(lambda _req: http_ok(bad_signature(pki)))
    cache = ResponseCache()
    assert (
        check([pki.leaf_good, pki.root], pki, cache, url=server.url, flags=frozenset({"NOSIGS"})).reason
        is None
    )
    strict = check([pki.leaf_good, pki.root], pki, cache, url=server.url).reason
    assert strict is not None and strict.startswith("OCSP: bad response signature")


def test_answer_without_next_update_uses_the_default_ttl(
    pki: Pki, fake: Callable[..., FakeResponder]
) -> None:
    server = fake(lambda req: http_ok(forge(pki, req)))  # no nextUpdate
    no_cache = ResponseCache(default_ttl=0)
    for _ in range(2):
        assert check([pki.leaf_good, pki.root], pki, no_cache, url=server.url).reason is None
    assert server.connections == 2
    short = ResponseCache(default_ttl=60)
    for _ in range(2):
        assert check([pki.leaf_good, pki.root], pki, short, url=server.url).reason is None
    assert server.connections == 3


# ------------------------------------------------------------------ flags, inputs, chains


def test_check_flags() -> None:
    assert check_flags([]) is None
    assert (
        check_flags(["NOVERIFY", "nosigs", "NoChecks", "NOTIME", "NOCERTS", "RESPID_KEY", "TRUSTOTHER"])
        is None
    )
    error = check_flags(["NOSIGS", "NONCE"])
    assert error is not None
    assert error.startswith("OCSPflag = 'NONCE': unknown OCSP flag")
    assert "NOVERIFY" in error and "NOTIME" in error
    notes = flag_notes(["notime", "NOVERIFY", "NOINTERN"])
    assert len(notes) == 2
    assert notes[0].startswith("OCSPflag = NOTIME has no effect")
    assert notes[1].startswith("OCSPflag = NOVERIFY:")
    assert OcspPolicy(flags=frozenset({"nosigs"})).flags == frozenset({"NOSIGS"})


def test_nothing_configured_means_no_check(pki: Pki) -> None:
    assert check([pki.leaf_revoked, pki.root], pki).reason is None  # neither OCSP nor OCSPaia


def test_unparsable_chain(pki: Pki) -> None:
    reason = asyncio.run(check_chain([b"not a certificate"], OcspPolicy(aia=True)))
    assert reason is not None and reason.startswith("OCSP: cannot parse the peer certificate chain")
    assert asyncio.run(check_chain([], OcspPolicy(aia=True))) == "OCSP: empty verification chain"


def _handshake(pki: Pki) -> ssl.SSLObject:
    d = pki.dir
    (d / "server.pem").write_bytes(_key_pem(pki.leaf_good_key) + _pem(pki.leaf_good))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "server.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(d / "root.pem")
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


def test_verified_chain_from_a_real_handshake(pki: Pki) -> None:
    client = _handshake(pki)
    chain = verified_chain(client)
    assert chain == [_der(pki.leaf_good), _der(pki.root)]
    policy = OcspPolicy(aia=True, trust=(pki.root,))
    assert asyncio.run(check_chain(chain, policy, cache=ResponseCache())) is None


def test_verified_chain_fallback_without_the_private_api(pki: Pki) -> None:
    class Old:
        """An SSL object without get_verified_chain (only getpeercert)."""

        def getpeercert(self, binary_form: bool = False) -> bytes:
            return _der(pki.leaf2)

    assert verified_chain(Old(), [pki.root, pki.inter]) == [_der(pki.leaf2), _der(pki.inter), _der(pki.root)]  # type: ignore[arg-type]
    assert verified_chain(Old(), []) == [_der(pki.leaf2)]  # type: ignore[arg-type]

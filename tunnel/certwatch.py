"""Certificate hot reload: watch each service's TLS files by content and swap its context.

Polling, by content hash, not mtime: a Kubernetes Secret volume replaces a symlinked
``..data`` directory, so the link's own mtime says nothing, while reading the path
follows the link to the new content.  On a change the service's TLS context is built
aside (the same ``tunnel.tls.build`` as at start-up); when it loads, new connections use
it and live ones keep theirs; when it does not (a broken file, a certificate that does
not match the key, a half-written pair), the file and the reason are logged, the last
good context stays in use, and the next change is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.tls import TlsConfig, TlsConfigError
from tunnel.tls import build as build_tls

if TYPE_CHECKING:
    import datetime

    from tunnel.settings import ServiceSettings

FILE_OPTIONS = ("cert", "key", "CAfile", "CRLfile", "PSKsecrets")
DIR_OPTIONS = ("CApath", "CRLpath")


def watched_files(svc: ServiceSettings) -> list[str]:
    files = [str(getattr(svc, o)) for o in FILE_OPTIONS if getattr(svc, o)]
    for opt in DIR_OPTIONS:
        path = getattr(svc, opt)
        if path and os.path.isdir(path):
            files += sorted(
                os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))
            )
    return files


def digest(paths: Iterable[str]) -> str:
    """One hash over every file's name and content (a missing file hashes as missing)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode() + b"\0")
        try:
            with open(path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        except OSError as exc:
            h.update(f"missing:{exc.errno}".encode())
    return h.hexdigest()


def record_not_after(service: str, path: str | None) -> None:
    """``pytunnel_cert_not_after_seconds{service,cert}`` for a service's own certificate."""
    if not path:
        return
    value = cert_not_after(path)
    if value is not None:
        STATS.cert_not_after[(service, path)] = value


def cert_not_after(path: str) -> float | None:
    from cryptography import x509

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if b"-----BEGIN CERTIFICATE" in data:
            leaf = x509.load_pem_x509_certificates(data)[0]
        else:
            from cryptography.hazmat.primitives.serialization import pkcs12

            leaf = pkcs12.load_key_and_certificates(data, None)[1]  # type: ignore[assignment]
            if leaf is None:
                return None
    except (OSError, ValueError, IndexError):
        return None
    when: datetime.datetime = leaf.not_valid_after_utc
    return when.timestamp()


class Watched(Protocol):
    """What the watcher needs of a service: its settings (the files), its TLS context
    (the generation) and a way to swap that context; SNI secondaries are watched too."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> ServiceSettings: ...
    @property
    def tls(self) -> TlsConfig: ...
    @property
    def secondaries(self) -> Sequence[Watched]: ...
    def swap_tls(self, tls: TlsConfig) -> None: ...


class CertWatcher:
    """Polls every ``interval`` seconds; ``services()`` gives the services in use now."""

    def __init__(self, services: Callable[[], Sequence[Watched]], secure: bool, interval: float) -> None:
        self._services = services
        self.secure = secure
        self.interval = interval
        self.seen: dict[int, str] = {}  # id(service) -> digest last acted on
        self.task: asyncio.Task[None] | None = None

    def current(self) -> list[Watched]:
        out: list[Watched] = []
        for service in self._services():
            out.append(service)
            out.extend(service.secondaries)
        return out

    def start(self) -> None:
        for service in self.current():
            self.seen[id(service)] = digest(watched_files(service.settings))
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> None:
        loop = asyncio.get_running_loop()
        services = self.current()
        live = {id(s) for s in services}
        self.seen = {k: v for k, v in self.seen.items() if k in live}
        for service in services:
            files = watched_files(service.settings)
            if not files:
                continue
            now = await loop.run_in_executor(None, digest, files)
            before = self.seen.setdefault(id(service), now)
            if now == before:
                continue
            self.seen[id(service)] = now
            self.reload(service)

    def reload(self, service: Watched) -> bool:
        svc = service.settings
        try:
            new = build_tls(svc, self.secure, service.tls.generation + 1)
        except TlsConfigError as exc:
            STATS.reloaded(False)
            log.ui(
                3,
                f"Service [{service.name}]: certificate reload failed: {exc}; keeping the certificates in use",
                event="cert_reload",
                service=service.name,
                result="failure",
            )
            return False
        service.swap_tls(new)
        STATS.reloaded(True)
        record_not_after(service.name, svc.cert)
        log.ui(
            5,
            f"Service [{service.name}]: certificates reloaded ({', '.join(watched_files(svc))}); "
            "new connections use them",
            event="cert_reload",
            service=service.name,
            result="success",
        )
        return True

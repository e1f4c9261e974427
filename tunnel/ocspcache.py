"""Verified, definitive OCSP answers until they expire, and lookups in progress that
concurrent connections share (one request to a responder, not one per connection).

Imports only the answer types of tunnel.ocspverify.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tunnel.ocspverify import Answer, Status

DEFAULT_TTL = 60.0  # cache seconds for a response without nextUpdate


CacheKey = tuple[object, ...]


class ResponseCache:
    """Verified definitive answers until they expire, plus in-flight lookups to share."""

    def __init__(self, max_entries: int = 4096, default_ttl: float = DEFAULT_TTL) -> None:
        self.max_entries = max_entries
        self.default_ttl = default_ttl
        self._entries: dict[CacheKey, tuple[float, Answer]] = {}
        self._inflight: dict[CacheKey, asyncio.Task[Answer]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache (``cache or CACHE``)
        return True

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: CacheKey) -> Answer | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key]
            return None
        return hit[1]

    def put(self, key: CacheKey, answer: Answer) -> None:
        if answer.status is Status.UNKNOWN:
            return
        ttl = self.default_ttl if answer.ttl is None else answer.ttl
        if ttl <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            for k in [k for k, (deadline, _) in self._entries.items() if deadline <= now]:
                del self._entries[k]
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
        self._entries.pop(key, None)
        self._entries[key] = (now + ttl, answer)

    async def lookup(self, key: CacheKey, fetch: Callable[[], Awaitable[Answer]]) -> tuple[Answer, str]:
        """(answer, how): ``cached``, ``shared`` (joined a lookup in progress) or ``fetched``."""
        hit = self.get(key)
        if hit is not None:
            return hit, "cached"
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        how = "shared"
        if task is None or task.done() or task.get_loop() is not loop:
            how = "fetched"

            async def run() -> Answer:
                answer = await fetch()
                self.put(key, answer)
                return answer

            task = loop.create_task(run())
            self._inflight[key] = task

            def forget(done: asyncio.Task[Answer], key: CacheKey = key) -> None:
                if self._inflight.get(key) is done:
                    del self._inflight[key]

            task.add_done_callback(forget)
        # shield: one connection giving up must not cancel the lookup others wait for
        return await asyncio.shield(task), how


CACHE = ResponseCache()

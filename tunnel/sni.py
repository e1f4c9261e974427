"""SNI virtual services (server mode): ``sni = PRIMARY:PATTERN`` in a secondary section.

The primary's SSLContext gets a servername callback that, for the first pattern matching the
name the client sent, switches the handshake to that secondary's context and notes the choice
for the connection's opening, which then serves the connection as the secondary (its
verification, its ``connect``).  The choice is held weakly per SSLObject, so a connection that
dies mid-handshake leaves nothing behind for a later object to inherit.

OpenSSL's ``SSL_set_SSL_CTX`` (what ``SSLObject.context = ...`` is) swaps the certificate, key
and trust store only; as stunnel's servername callback does, the switch then sets the
secondary's verify mode, verify callback, depth and flags on the connection
(tunnel/osslconn.py), so its ``verifyChain``/``verifyPeer``/``requireCert``, CRLs and
``redirect`` apply.  Where that cannot be done the handshake ends with an internal error
alert: never serve a secondary without its verification.

Imports osslconn (a leaf); the secondary is any object with a ``name`` and a current
SSLContext.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from tunnel import ossl, osslconn


class Virtual(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Virtual)


class SniSwitch(Generic[T]):
    """One primary's patterns, installed on its context as the servername callback."""

    def __init__(self, secondaries: list[tuple[str, T]], context_of: Callable[[T], ssl.SSLContext]) -> None:
        self.patterns = [(pattern.lower(), sec) for pattern, sec in secondaries]
        self.context_of = context_of
        # the callback's choice, per SSLObject until its handshake ends
        self._choice: weakref.WeakKeyDictionary[object, tuple[T | None, str, str]] = (
            weakref.WeakKeyDictionary()
        )

    def install(self, context: ssl.SSLContext) -> None:
        """The callback on the primary's context; raises :class:`tunnel.ossl.Unavailable`
        when this Python cannot give a switched connection its secondary's verification."""
        osslconn.check_layout(context)
        context.sni_callback = self._pick

    def _pick(self, sslobj: object, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not name:
            return None
        lowered = name.lower()
        for pattern, sec in self.patterns:
            if sni_matches(lowered, pattern):
                sslobj.context = self.context_of(sec)  # type: ignore[attr-defined]
                try:
                    osslconn.adopt_verification(sslobj)
                except ossl.Unavailable:
                    self._choice[sslobj] = (None, name, "!")
                    return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
                self._choice[sslobj] = (sec, name, pattern)
                return None
        self._choice[sslobj] = (None, name, "")
        return None

    def chosen(self, sslobj: object, say: Callable[[int, str], None]) -> T | None:
        """The secondary the client's name chose during the handshake (None: the primary
        serves), logged with stunnel's lines."""
        choice = self._choice.pop(sslobj, None)
        if choice is None:
            return None
        target, name, pattern = choice
        say(6, f"SNI: requested servername: {name}")
        if target is None:
            say(3, f"SNI: no pattern matched servername: {name}")
            return None
        say(7, f"SNI: matched pattern: {pattern}")
        say(5, f"SNI: switched to service [{target.name}]")
        return target


def sni_matches(name: str, pattern: str) -> bool:
    """stunnel's SNI pattern (both lower-case): a leading ``*`` matches any prefix, dots
    included (``*.example.com`` takes ``a.b.example.com``); every other character, ``*``, ``?``
    and ``[`` included, is literal."""
    if pattern.startswith("*"):
        return name.endswith(pattern[1:])
    return name == pattern

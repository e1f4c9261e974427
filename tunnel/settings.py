"""The option classes the run path uses, and what is derived from them.

``ServiceSettings`` and ``GlobalSettings`` are the plain classes of ``settings_table.py``,
generated from the pydantic models of ``options.py`` (the one option list: alias = stunnel's
spelling, default, help, why unsupported) by ``tools/gen_settings.py``; they validate with the
same parsers (``values.py``) and say the same words, without importing pydantic (start-up
time and memory).  The reader (``conf.py``) feeds raw strings in; everything typed comes out
of here.  The rules between options live in ``rules/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunnel.plain import Field, ValidationError
from tunnel.settings_table import GlobalSettings, ServiceSettings

__all__ = [
    "ALIASES",
    "CANONICAL",
    "GLOBAL_FIELDS",
    "SERVICE_FIELDS",
    "GlobalSettings",
    "ServiceSettings",
    "Settings",
    "ValidationError",
    "field_meta",
    "is_global_only",
    "is_repeatable",
    "version_range",
    "written_after",
]

ALIASES = {"curve": "curves", "session": "sessionCacheTimeout"}


def _fields(model: type[ServiceSettings | GlobalSettings]) -> dict[str, Field]:
    return {f.alias: f for f in model.model_fields.values() if f.alias}


SERVICE_FIELDS = _fields(ServiceSettings)
GLOBAL_FIELDS = _fields(GlobalSettings)
#: lower-case name (and alias) -> canonical stunnel spelling
CANONICAL: dict[str, str] = {name.lower(): name for name in [*SERVICE_FIELDS, *GLOBAL_FIELDS]}
CANONICAL.update({k: v for k, v in ALIASES.items()})


def field_meta(name: str) -> dict[str, Any]:
    info = SERVICE_FIELDS.get(name) or GLOBAL_FIELDS[name]
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def is_repeatable(name: str) -> bool:
    return bool(field_meta(name).get("repeat"))


def is_global_only(name: str) -> bool:
    return name in GLOBAL_FIELDS


@dataclass(frozen=True)
class Settings:
    """A whole configuration: global options plus the services."""

    source: str
    globals: GlobalSettings
    defaults: ServiceSettings
    services: list[ServiceSettings]
    inetd: bool = False

    @property
    def log_level(self) -> int:
        return self.defaults.debug[1]


def written_after(svc: ServiceSettings, later: str, earlier: str) -> bool:
    """Does the line setting ``later`` come after the one setting ``earlier``?  stunnel
    applies lines in order, so where two options set the same thing the later one wins.
    (Lines of the global section come first; where the order is unknown, ``later`` wins.)"""
    a, b = svc.locations.get(later), svc.locations.get(earlier)
    if a is None:  # from the global section: before any line of the service's own
        return b is None
    if b is None or a[0] != b[0]:
        return True
    return a[1] > b[1]


def version_range(svc: ServiceSettings) -> tuple[str | None, str | None]:
    """(min, max) TLS versions: sslVersion sets both, unless a later sslVersionMin/Max line
    overrides one of them (and the other way round), in the order stunnel reads them."""
    lo, hi = svc.sslVersionMin, svc.sslVersionMax
    if svc.sslVersion:
        if lo is None or written_after(svc, "sslVersion", "sslVersionMin"):
            lo = svc.sslVersion
        if hi is None or written_after(svc, "sslVersion", "sslVersionMax"):
            hi = svc.sslVersion
    return lo, hi

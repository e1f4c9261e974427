"""Error types and exit codes shared by the whole package."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: stunnel exits 1 after "Configuration failed"; we keep that for config errors.
CONFIG_FAILURE = 1
#: Configuration was fine but the process could not start (bind, privileges, ...).
STARTUP_FAILURE = 3


class Severity(enum.Enum):
    """How much a :class:`Problem` weighs."""

    ERROR = "error"  # the configuration is refused
    WARNING = "warning"  # logged; the configuration is used
    NOTICE = "notice"  # logged at LOG5; the configuration is used


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, located where it was written."""

    message: str
    file: str | None = None
    line: int | None = None
    text: str | None = None
    hint: str | None = None
    severity: Severity = Severity.ERROR

    def render(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        quoted = f'"{self.text}": ' if self.text is not None else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"{where}{quoted}{self.message}{hint}"


@dataclass
class ConfigError(Exception):
    """Every problem found in a configuration (we collect them all, then fail)."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class StartupError(Exception):
    """The configuration is valid but the tunnel could not start."""

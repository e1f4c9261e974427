"""stunnel.conf reader.

Reads what stunnel's parser reads -- global options, then ``[service]`` sections;
``;`` and ``#`` comments; blank and indented lines; a UTF-8 BOM; case-insensitive
option names and the aliases ``curve``/``session``; repeatable options in order;
``include = DIR`` -- and turns it into :class:`tunnel.settings.Settings`.  Every
value remembers its file and line, and every problem is collected before failing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunnel import rules
from tunnel.errors import ConfigError, Problem
from tunnel.settings import (
    CANONICAL,
    GLOBAL_FIELDS,
    SERVICE_FIELDS,
    GlobalSettings,
    ServiceSettings,
    Settings,
    ValidationError,
    field_meta,
    is_repeatable,
)
from tunnel.values import gid_of, uid_of

MAX_INCLUDE_DEPTH = 8


@dataclass(frozen=True)
class Entry:
    """One ``name = value`` line."""

    name: str  # canonical stunnel spelling
    value: str
    file: str
    line: int
    text: str

    def problem(self, message: str, hint: str | None = None) -> Problem:
        return Problem(message, self.file, self.line, self.text, hint)


@dataclass
class Section:
    name: str
    file: str
    line: int
    text: str
    entries: list[Entry] = field(default_factory=list)
    broken: bool = False  # its header was refused: its lines are read but not checked again


@dataclass
class RawConfig:
    source: str
    globals: list[Entry] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bom: bool = False


def _suggest(name: str) -> str | None:
    import difflib  # only for a misspelt option: not at start-up

    close = difflib.get_close_matches(name.lower(), list(CANONICAL), n=1, cutoff=0.7)
    if close:
        return f'did you mean "{CANONICAL[close[0]]}"?'
    return None


class Reader:
    def __init__(self, source: str) -> None:
        self.raw = RawConfig(source=source)
        self._current: Section | None = None
        self._reading: list[str] = []  # the include chain, to catch a file that includes itself

    def read_file(self, path: str, depth: int = 0) -> None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            self.raw.problems.append(Problem(f"Cannot open configuration file: {exc.strerror}", path))
            return
        self._reading.append(os.path.realpath(path))
        try:
            self.read_bytes(data, path, depth)
        finally:
            self._reading.pop()

    def read_bytes(self, data: bytes, path: str, depth: int = 0) -> None:
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
            if depth == 0:
                self.raw.bom = True
        for number, raw_line in enumerate(data.split(b"\n"), start=1):
            try:
                text = raw_line.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError:
                guess = raw_line.decode("latin-1").strip()
                if not guess or guess[0] in ";#":
                    continue  # a comment in another encoding (old latin-1 files): stunnel skips it too
                if guess.startswith("["):
                    self._open_broken(path, number, guess)
                self.raw.problems.append(
                    Problem(
                        "the line is not valid UTF-8",
                        path,
                        number,
                        raw_line.decode("utf-8", "replace").rstrip("\r"),
                        "save the file as UTF-8",
                    )
                )
                continue
            if "\x00" in text:
                self.raw.problems.append(Problem("the line holds a NUL character", path, number, text, None))
                continue
            self._line(text, path, number, depth)

    def _line(self, written: str, path: str, number: int, depth: int) -> None:
        # errors quote the line as written (indentation kept), as stunnel does:
        #   FILE:LINE: "    retry = 10": The argument needs to be either 'yes' or 'no'
        line = written.strip()
        if not line or line[0] in ";#":
            return
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                self.raw.problems.append(
                    Problem(
                        "No '=' found (malformed section header)", path, number, written, "write it as [NAME]"
                    )
                )
                self._open_broken(path, number, written)
                return
            name = line[1:-1].strip()
            if not name:
                self.raw.problems.append(
                    Problem("empty section name", path, number, written, "write it as [NAME]")
                )
                self._open_broken(path, number, written)
                return
            section = Section(name, path, number, written)
            self.raw.sections.append(section)
            self._current = section
            return
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            self.raw.problems.append(
                Problem(
                    'No \'=\' found: expected "option = value", "[section]" or a comment',
                    path,
                    number,
                    written,
                    "comments start with ; or #",
                )
            )
            return
        canon = CANONICAL.get(name.lower())
        if canon is None:
            self.raw.problems.append(
                Problem(
                    "Specified option name is not valid here",
                    path,
                    number,
                    written,
                    _suggest(name) or "`pytunnel -help` lists the options",
                )
            )
            return
        entry = Entry(canon, value, path, number, written)
        if canon == "include":
            self._include(entry, depth)
            return
        if self._current is None:
            self.raw.globals.append(entry)
        elif canon in GLOBAL_FIELDS:
            self.raw.problems.append(
                entry.problem(
                    f"{canon} is a global option and is not valid inside [{self._current.name}]",
                    "move it above the first [section]",
                )
            )
        else:
            self._current.entries.append(entry)

    def _open_broken(self, path: str, number: int, written: str) -> None:
        """A section header that was refused still starts a section: the lines below it
        belong to it (not to the global section, which would report them again as if
        they were misplaced)."""
        section = Section("", path, number, written, broken=True)
        self.raw.sections.append(section)
        self._current = section

    def _include(self, entry: Entry, depth: int) -> None:
        if depth >= MAX_INCLUDE_DEPTH:
            self.raw.problems.append(entry.problem("includes nested too deeply (a loop?)"))
            return
        folder = entry.value
        if not folder:
            self.raw.problems.append(
                entry.problem(
                    "include needs a directory",
                    "include = /etc/stunnel/conf.d (its files are read in name order)",
                )
            )
            return
        if not os.path.isabs(folder):
            folder = os.path.join(os.path.dirname(entry.file), folder)
        try:
            names = sorted(os.listdir(folder))
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            self.raw.problems.append(
                entry.problem(
                    f"cannot read the include directory: {reason}",
                    "include takes a directory whose files are read in name order",
                )
            )
            return
        before = len(self.raw.problems)
        self._include_files(entry, folder, names, depth)
        if len(self.raw.problems) > before:  # stunnel's line after the included file's error
            self.raw.problems.append(entry.problem("Failed to include a file"))

    def _include_files(self, entry: Entry, folder: str, names: list[str], depth: int) -> None:
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            if os.path.realpath(path) in self._reading:
                self.raw.problems.append(
                    entry.problem(
                        f"the include directory holds {name}, which is being read (a loop)",
                        "include another directory",
                    )
                )
                continue
            self.read_file(path, depth + 1)


def read(path: str) -> RawConfig:
    reader = Reader(path)
    reader.read_file(path)
    if reader.raw.problems and not os.path.isfile(path):
        raise ConfigError(reader.raw.problems)
    return reader.raw


def read_bytes(data: bytes, source: str) -> RawConfig:
    reader = Reader(source)
    reader.read_bytes(data, source)
    return reader.raw


# ----------------------------------------------------------------- to Settings

#: validates one section's data: a model's ``model_validate``, raising ``plain.ValidationError``
Validate = Callable[[dict[str, Any]], Any]
#: the run path's plain models; ``options.validators()`` gives the pydantic ones
PLAIN: tuple[Validate, Validate] = (GlobalSettings.model_validate, ServiceSettings.model_validate)


def _collect(entries: list[Entry], problems: list[Problem]) -> dict[str, list[Entry]]:
    """Group entries by option, rejecting unsupported values on the way."""
    grouped: dict[str, list[Entry]] = {}
    for entry in entries:
        meta = field_meta(entry.name)
        why = meta.get("unsupported")
        if why and entry.value.lower() not in meta.get("accepted", []):
            if entry.name == "fips":
                problems.append(entry.problem(why))
            else:
                problems.append(
                    entry.problem(
                        f"{entry.name} is not supported: {why}",
                        "remove the line",
                    )
                )
            continue
        grouped.setdefault(entry.name, []).append(entry)
    return grouped


def _validate(
    validate: Validate,
    grouped: dict[str, list[Entry]],
    extra: dict[str, Any],
    problems: list[Problem],
    fallback: Problem,
) -> Any:
    data: dict[str, Any] = dict(extra)
    for name, entries in grouped.items():
        meta = field_meta(name)
        if meta.get("unsupported") or name == "include":
            continue  # accepted "off" values of unsupported options change nothing
        if is_repeatable(name):
            data[name] = [e.value for e in entries]
        else:
            data[name] = entries[-1].value
    try:
        return validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = err["loc"]
            msg = str(err["msg"]).removeprefix("Value error, ")
            name = str(loc[0]) if loc else ""
            entries = grouped.get(name, [])
            entry: Entry | None = None
            if entries:
                idx = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
                entry = entries[idx] if -len(entries) <= idx < len(entries) else entries[-1]
            if entry is not None:
                problems.append(entry.problem(msg))
            else:
                problems.append(Problem(f"{name}: {msg}", fallback.file, fallback.line, fallback.text))
        return None


def _check_ids(entries: list[Entry]) -> list[Problem]:
    """Global setuid/setgid: a name this system does not know is a configuration error, as
    in stunnel (not a start-up failure after the ports are bound)."""
    out = []
    for e in entries:
        if e.name not in ("setuid", "setgid"):
            continue
        try:
            (uid_of if e.name == "setuid" else gid_of)(e.value.strip())
        except KeyError:
            what, db = ("UID", "user") if e.name == "setuid" else ("GID", "group")
            out.append(
                e.problem(
                    f"Illegal {what}", f"no {db} {e.value!r} on this system; create it or give a number"
                )
            )
    return out


def build(raw: RawConfig, models: tuple[Validate, Validate] = PLAIN) -> Settings:
    """Validate a read configuration; raise ConfigError listing every problem.  ``models``:
    how the global section and a service are validated (``PLAIN``, or the pydantic models of
    ``options.validators()``, which ``pytunnel check`` compares)."""
    validate_global, validate_service = models
    problems = list(raw.problems)
    if any(p.message.startswith("Cannot open configuration file") and p.file == raw.source for p in problems):
        raise ConfigError(problems)  # nothing was read: no rule about its (absent) services applies
    top = Problem("", raw.source, None, None)

    glob_entries = [e for e in raw.globals if e.name in GLOBAL_FIELDS]
    default_entries = [e for e in raw.globals if e.name in SERVICE_FIELDS]

    gsettings = _validate(validate_global, _collect(glob_entries, problems), {}, problems, top)
    defaults_grouped = _collect(default_entries, problems)
    defaults = _validate(validate_service, defaults_grouped, {}, problems, top)
    problems.extend(_check_ids(default_entries))

    services: list[ServiceSettings] = []
    inetd = not raw.sections
    sections = raw.sections or [Section(gsettings.service if gsettings else "stunnel", raw.source, 0, "")]
    seen: set[str] = set()
    for section in sections:
        if section.broken:
            continue
        where = Problem("", section.file, section.line or None, section.text or None)
        if section.name.lower() in seen:
            problems.append(
                Problem(
                    f"duplicate section [{section.name}]",
                    section.file,
                    section.line,
                    section.text,
                    "give each service its own name",
                )
            )
        seen.add(section.name.lower())
        local_problems: list[Problem] = []
        grouped: dict[str, list[Entry]] = {k: list(v) for k, v in defaults_grouped.items()}
        if not inetd:
            for name, entries in _collect(section.entries, local_problems).items():
                if is_repeatable(name):
                    grouped.setdefault(name, []).extend(entries)
                else:
                    grouped[name] = entries
        locations = {name: (e[-1].file, e[-1].line, e[-1].text) for name, e in grouped.items() if e}
        local_problems.extend(_check_ids(section.entries))  # a Unix accept socket's owner
        svc = _validate(
            validate_service, grouped, {"name": section.name, "locations": locations}, local_problems, where
        )
        if svc is not None and not local_problems:
            local_problems.extend(rules.check_service(svc, where, inetd))
            services.append(svc)
        problems.extend(local_problems)

    problems.extend(rules.check_services(services, raw.source, gsettings.chroot if gsettings else None))

    # duplicates across files make the same problem twice; keep the first
    unique: list[Problem] = []
    for p in problems:
        if p not in unique:
            unique.append(p)
    if unique:
        unique.sort(key=lambda p: (p.file or "", p.line or 0))
        raise ConfigError(unique)
    assert gsettings is not None and defaults is not None
    return Settings(source=raw.source, globals=gsettings, defaults=defaults, services=services, inetd=inetd)


def load(path: str) -> Settings:
    return build(read(path))


def load_bytes(data: bytes, source: str) -> Settings:
    return build(read_bytes(data, source))

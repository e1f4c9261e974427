"""stunnel-format logging: ``YYYY.MM.DD HH:MM:SS LOG5[id]: text``.

Before the configuration is read, lines go to stderr as ``[!] text`` (error),
``[:] text`` (warning), ``[.] text`` (notice) or ``[ ] text`` (info/debug), as stunnel
prints them.  Afterwards they go where the global options say: stderr with
``foreground = yes``, the ``output`` file, and syslog (``syslog = yes``, stunnel's
default on Unix; when ``/dev/log`` is missing we say so once and carry on).
Callers check :meth:`Log.enabled` before formatting anything costly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import IO, TextIO

LEVEL_NAMES = {
    0: "emerg", 1: "alert", 2: "crit", 3: "err", 4: "warning", 5: "notice", 6: "info", 7: "debug",
}  # fmt: skip
EARLY_TAGS = {0: "!", 1: "!", 2: "!", 3: "!", 4: ":", 5: ".", 6: " ", 7: " "}
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip


class Log:
    def __init__(self) -> None:
        self.level = 5
        self.early = True
        self.to_stderr = True
        self.file: TextIO | IO[str] | None = None
        self.file_path: str | None = None
        self.file_mode = "a"
        self.syslog: socket.socket | None = None
        self.ident = "stunnel"
        self.facility = 3
        self._stamp_sec = -1
        self._stamp = ""
        self.errors_seen: list[str] = []
        self.buffer: list[tuple[int, str, str]] = []
        self.json = False  # --log-format json: one object a line
        # chroot: until the process enters the jail, `output` names a file inside it (stunnel
        # opens its log after chroot, so the same path must mean the same file before and after)
        self.root: str | None = None

    # ---- configuration ---------------------------------------------------------
    def configure(
        self,
        level: int,
        foreground: str,
        output: str | None,
        overwrite: bool,
        use_syslog: bool,
        ident: str,
        facility: str,
        root: str | None = None,
    ) -> bool:
        """False when the output file cannot be opened (stunnel's line is logged)."""
        self.root = root
        self.early = False
        self.to_stderr = foreground == "yes"
        self.file_mode = "w" if overwrite else "a"
        opened = self.reconfigure(level, output, use_syslog, ident, facility)
        pending, self.buffer = self.buffer, []
        for lvl, ident, text in pending:
            self.write(lvl, ident, text)
        return opened

    def flush_early(self) -> None:
        """Print what was buffered before the configuration was known, stunnel's way."""
        pending, self.buffer = self.buffer, []
        lines = []
        for lvl, ident, text in pending:
            if lvl <= self.level:
                if self.json:
                    lines.append(self._json(lvl, ident, text, None) + "\n")
                else:
                    lines.append(f"[{EARLY_TAGS.get(lvl, ' ')}] {text}\n")
        _stderr("".join(lines))

    def open_file(self) -> bool:
        """Open (or, on SIGUSR1 and reload, reopen) the output file.  The old file is closed
        only once the new one is open; when the new one cannot be, stunnel's line is logged
        and logging goes on where it went (False)."""
        if self.file_path is None:
            return True
        new: TextIO | IO[str]
        if self.file_path in ("/dev/stdout", "-"):
            new = sys.stdout
        elif self.file_path == "/dev/stderr":
            new = sys.stderr
        else:
            path = os.path.join(self.root, self.file_path.lstrip("/")) if self.root else self.file_path
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if self.file_mode == "w" else os.O_APPEND)
            try:
                fd = os.open(path, flags, 0o640)  # stunnel's mode: the log is not for every user
            except OSError as exc:
                self.write(3, "ui", f"Cannot open log file: {self.file_path}")
                self.write(3, "ui", f"open: {exc.strerror} ({exc.errno})")
                return False
            new = open(fd, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        old, self.file = self.file, new
        self.file_mode = "a"  # a reopen (SIGUSR1) never truncates
        if old is not new:
            _close(old)
        return True

    def close_file(self) -> None:
        old, self.file, self.file_path = self.file, None, None
        _close(old)

    def entered_jail(self, uid: int | None, gid: int | None) -> None:
        """After chroot, before setuid: the output file's path is inside the jail now, and
        the file belongs to the user that reopens it on SIGUSR1 (as stunnel creates it)."""
        self.root = None
        if self.file is not None and self.file not in (sys.stdout, sys.stderr) and (uid, gid) != (None, None):
            with contextlib.suppress(OSError):
                os.fchown(self.file.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)

    def reopen(self) -> bool:
        """SIGUSR1: reopen the output file (after log rotation)."""
        return self.open_file()

    def reconfigure(
        self, level: int, output: str | None, use_syslog: bool, ident: str, facility: str
    ) -> bool:
        """Level, syslog and output, at start and on a SIGHUP reload: the output file is
        (re)opened each time (stunnel closes and opens its log around a reload: rotation by
        HUP).  False when it cannot be opened."""
        self.level = level
        self.ident = ident
        self.facility = FACILITIES.get(facility, 3)
        opened = True
        if output:
            self.file_path = output
            opened = self.open_file()
        elif self.file is not None:
            self.close_file()
        if use_syslog and self.syslog is None:
            self._open_syslog()
        elif not use_syslog and self.syslog is not None:
            self.syslog.close()
            self.syslog = None
        return opened

    def _open_syslog(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect("/dev/log")
        except OSError:
            sock.close()
            self.syslog = None
            self.write(4, "ui", "syslog is not available (no /dev/log): logging to stderr/output only")
            self.to_stderr = self.to_stderr or self.file is None
            return
        self.syslog = sock

    # ---- writing -----------------------------------------------------------------
    def enabled(self, level: int) -> bool:
        return level <= self.level

    def _timestamp(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._stamp_sec:
            self._stamp_sec = sec
            self._stamp = time.strftime("%Y.%m.%d %H:%M:%S", time.localtime(sec))
        return self._stamp

    def write(
        self,
        level: int,
        ident: str,
        text: str,
        threshold: int | None = None,
        fields: dict[str, object] | None = None,
    ) -> None:
        if level > (self.level if threshold is None else threshold) and not self.early:
            return
        if level <= 3:
            self.errors_seen.append(text)
            del self.errors_seen[:-50]
        if self.early:
            self.buffer.append((level, ident, text))
            return
        if self.json:
            body = line = self._json(level, ident, text, fields) + "\n"
        else:
            body = f"LOG{level}[{ident}]: {text}"
            now = time.time()  # the second's stamp is made once (_timestamp, inlined: per line)
            stamp = self._stamp if int(now) == self._stamp_sec else self._timestamp()
            line = f"{stamp} {body}\n"
        if self.to_stderr:
            try:  # _stderr, inlined: a connection's lines come here
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                self.to_stderr = _stderr(line)
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: closed under us
                self.file.write(line)
        if self.syslog is not None:
            # what glibc's syslog() sends for stunnel's openlog(ident, LOG_CONS | LOG_NDELAY):
            # an RFC 3164 header with the C locale's time stamp, no pid
            stamp = time.strftime("%b %e %H:%M:%S")
            msg = f"<{self.facility * 8 + level}>{stamp} {self.ident}: {body}"
            with contextlib.suppress(OSError):
                self.syslog.send(msg.encode("utf-8", "replace"))

    def ui(self, level: int, text: str, **fields: object) -> None:
        self.write(level, "ui", text, fields=fields or None)

    @staticmethod
    def _json(level: int, ident: str, text: str, fields: dict[str, object] | None) -> str:
        """One JSON object: time, level, id, event, message, then the event's own fields."""
        import datetime  # only JSON log lines need these: not at start-up
        import json

        doc: dict[str, object] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "level": LEVEL_NAMES.get(level, str(level)),
            "id": ident,
            "event": "log",
        }
        if fields:
            doc.update(fields)
        doc["message"] = text
        return json.dumps(doc, separators=(",", ":"), default=str)


log = Log()


def _close(file: TextIO | IO[str] | None) -> None:
    """Close a log file we opened (never stdout/stderr), whatever state it is in."""
    if file is not None and file not in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            file.close()


def _stderr(text: str) -> bool:
    """Write to stderr; False once it is gone (a closed pipe: the reader of a foreground
    process died).  Like stunnel, pytunnel goes on serving, and still obeys signals: the
    error must not escape into a signal handler or the drain.  sys.stderr becomes
    /dev/null so the interpreter's own last flush cannot fail either."""
    if not text:
        return True
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        return False
    return True

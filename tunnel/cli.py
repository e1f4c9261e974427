"""The entry point: stunnel's own command line, and the click commands (``tunnel.commands``).

``pytunnel CONFIG`` (no subcommand), ``pytunnel -fd N``, ``-version``, ``-help``,
``-sockets`` and ``-options`` behave as stunnel's do, so scripts written for stunnel
keep working.  ``pytunnel run CONFIG`` applies pytunnel's secure defaults.  Neither
imports click (about 8 ms of start-up): stunnel's command line never does, and
``pytunnel run CONFIG`` without flags or PYTUNNEL_RUN_* variables takes the same
steps as the click command does (anything else goes to click).
"""

from __future__ import annotations

import os
import sys

from tunnel.config import Config, Ops, Source, banner, fd_source
from tunnel.errors import CONFIG_FAILURE
from tunnel.launch import start
from tunnel.settings import GLOBAL_FIELDS, SERVICE_FIELDS, ServiceSettings, field_meta
from tunnel.sockopts import sockets_text
from tunnel.values import SSL_OPTIONS

#: the click commands (``tunnel.commands``); a test keeps this equal to them
COMMANDS = frozenset({"run", "check", "healthcheck", "top", "version"})
WINDOWS_FLAGS = {"-install", "-uninstall", "-start", "-stop", "-reload", "-reopen", "-exit", "-quiet"}
STUNNEL_FLAGS = {"-version", "-help", "-sockets", "-options", "-fd"} | WINDOWS_FLAGS


# ------------------------------------------------------------------ stunnel's command line

STUNNEL_HELP = """\
Syntax:
pytunnel [<filename>] ; start pytunnel with the stunnel configuration file
pytunnel -fd <n>      ; read the config file from a file descriptor
pytunnel -help        ; get config file help
pytunnel -version     ; display version and defaults
pytunnel -sockets     ; display default socket options
pytunnel -options     ; display supported TLS options
pytunnel run CONFIG   ; run with pytunnel's secure defaults (see pytunnel --help)
"""


def _defaults_text() -> list[str]:
    lines = [" ", "Global options:"]
    for name in ("RNDbytes", "RNDfile", "RNDoverwrite"):
        info = GLOBAL_FIELDS[name]
        value = info.default
        if isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{name:<22} = {value}")
    lines += [" ", "Service-level options:"]
    d = ServiceSettings()
    lines += [
        f"{'ciphers':<22} = {d.ciphers}",
        f"{'ciphersuites':<22} = {d.ciphersuites} (with TLSv1.3)",
        f"{'curves':<22} = {d.curves}",
        f"{'debug':<22} = daemon.notice",
        f"{'logId':<22} = {d.logId}",
        f"{'options':<22} = NO_SSLv2",
        f"{'options':<22} = NO_SSLv3",
        f"{'securityLevel':<22} = {d.securityLevel}",
        f"{'sessionCacheSize':<22} = {d.sessionCacheSize}",
        f"{'sessionCacheTimeout':<22} = {d.sessionCacheTimeout} seconds",
        f"{'stack':<22} = {d.stack} bytes",
        f"{'TIMEOUTbusy':<22} = {d.TIMEOUTbusy} seconds",
        f"{'TIMEOUTclose':<22} = {d.TIMEOUTclose} seconds",
        f"{'TIMEOUTconnect':<22} = {d.TIMEOUTconnect} seconds",
        f"{'TIMEOUTidle':<22} = {d.TIMEOUTidle} seconds",
        f"{'verify':<22} = none",
    ]
    return lines


def _options_text() -> list[str]:
    return ["Supported TLS options:"] + [f"options = {name}" for name in SSL_OPTIONS]


def _help_text() -> list[str]:
    """stunnel's -help: the banner, then `NAME<padding>= description` per option."""
    lines = [*banner(), " ", "Global options:"]
    for fields in (GLOBAL_FIELDS, SERVICE_FIELDS):
        if fields is SERVICE_FIELDS:
            lines += [" ", "Service-level options:"]
        for name, info in fields.items():
            why = field_meta(name).get("unsupported")
            lines.append(f"{name:<22} = {info.description}" + (f" [not supported: {why}]" if why else ""))
    lines += [" ", STUNNEL_HELP]
    return lines


def stunnel_main(args: list[str]) -> int:
    first = args[0]
    err = sys.stderr
    if first in WINDOWS_FLAGS:
        err.write(f"{first}: this option exists only in stunnel's Windows build\n")
        return CONFIG_FAILURE
    if first == "-version":
        err.write("\n".join(banner() + _defaults_text()) + "\n")
        return 0
    if first == "-sockets":
        err.write("\n".join(banner()[:3] + [" "] + sockets_text()) + "\n")
        return 0
    if first == "-options":
        err.write("\n".join(banner()[:3] + [" "] + _options_text()) + "\n")
        return 0
    if first == "-help":
        err.write("\n".join(_help_text()) + "\n")
        return 0
    if first == "-fd":
        if len(args) < 2 or not args[1].isdigit():
            err.write("-fd needs a file descriptor number, e.g. pytunnel -fd 3\n")
            return CONFIG_FAILURE
        ops = _env_ops()
        if isinstance(ops, int):
            return ops
        source = fd_source(int(args[1]))
        return source if isinstance(source, int) else start(Config(source, secure=False, ops=ops))
    if len(args) > 1:
        err.write(f"unexpected arguments after {first}: {' '.join(args[1:])}\n{STUNNEL_HELP}")
        return CONFIG_FAILURE
    ops = _env_ops()
    return ops if isinstance(ops, int) else start(Config(Source(first), secure=False, ops=ops))


def _env_ops() -> Ops | int:
    """stunnel's command line has no room for pytunnel's flags: PYTUNNEL_* variables instead."""
    try:
        ops = Ops.from_env()
    except ValueError as exc:
        sys.stderr.write(f"[!] {exc}\n[!] Configuration failed\n")
        return CONFIG_FAILURE
    return ops


def plain_run(args: list[str]) -> Config | None:
    """``pytunnel run CONFIG`` with no flag and no PYTUNNEL_RUN_* variable: the Config the
    click command would build, or None where click must read the command line (a flag, a
    directory, a bad PYTUNNEL_* value, which click reports in its words)."""
    if len(args) != 2 or args[0] != "run" or args[1].startswith("-"):
        return None
    path = args[1]
    if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.R_OK)):
        return None  # click.Path(dir_okay=False) refuses these
    if any(name.startswith("PYTUNNEL_RUN_") for name in os.environ):
        return None
    try:
        ops = Ops.from_env()  # the variables of `run`'s operations options but PYTUNNEL_RUN_*
    except ValueError:
        return None
    return Config(Source(path), secure=True, ops=ops)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and (args[0] in STUNNEL_FLAGS or (not args[0].startswith("-") and args[0] not in COMMANDS)):
        sys.exit(stunnel_main(args))
    config = plain_run(args)
    if config is not None:
        try:
            code = start(config)
        except KeyboardInterrupt:  # as click's standalone mode says it (before the handlers)
            sys.stderr.write("\nAborted!\n")
            code = 1
        sys.exit(code)
    from tunnel.commands import cli

    cli.main(args=args, prog_name="pytunnel", auto_envvar_prefix="PYTUNNEL")


if __name__ == "__main__":
    main()

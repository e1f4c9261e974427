"""The click commands: ``pytunnel run|check|healthcheck|top|version`` and ``--help``.

``tunnel.cli`` (the entry point) imports this module only when the command line needs click:
``pytunnel CONFIG`` (stunnel's command line) and a plain ``pytunnel run CONFIG`` start
without it (click costs ~8 ms of start-up).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tunnel import __version__, envconf
from tunnel.config import OPS, Config, Ops, Source, banner, env_source
from tunnel.launch import start
from tunnel.status import probe

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="pytunnel")
def cli() -> None:
    """pytunnel: a TLS tunnel that reads stunnel.conf.

    \b
    Examples:
      pytunnel run examples/stunnel.conf     # secure defaults (verify upstreams)
      pytunnel check /etc/stunnel/gmail.conf # validate, load certs, bind nothing
      pytunnel /etc/stunnel/stunnel.conf     # exactly like `stunnel CONFIG`

    Every option also reads an environment variable: PYTUNNEL_<COMMAND>_<OPTION>
    (e.g. PYTUNNEL_CHECK_STUNNEL_DEFAULTS=1); the operations options of `run` read
    PYTUNNEL_STATUS, PYTUNNEL_DRAIN_TIMEOUT, PYTUNNEL_PRE_DRAIN_DELAY,
    PYTUNNEL_CERT_RELOAD_INTERVAL and PYTUNNEL_LOG_FORMAT, which `pytunnel CONFIG`
    (stunnel's command line) honours too.
    """


def _source(config: str | None) -> Source | int:
    """CONFIG, or with none given, the env-only service (STUNNEL_SERVICE, STUNNEL_ACCEPT, ...)."""
    if config is not None:
        return Source(config)
    if envconf.wanted():
        return env_source()
    raise click.UsageError(
        "give a CONFIG file (or PYTUNNEL_CONFIG), or describe one service with "
        "STUNNEL_SERVICE, STUNNEL_ACCEPT and STUNNEL_CONNECT"
    )


def ops_option(attr: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` for the ``Ops`` field ``attr``: its variables and parser from OPS."""
    var = OPS[attr]

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return var.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc) if var.names_value else f"{value!r}: {exc}") from None

    return click.option(*decls, type=str, envvar=list(var.envvars), callback=parse, **kwargs)


@cli.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False), envvar="PYTUNNEL_CONFIG", required=False)
@ops_option(
    "drain_timeout",
    "--drain-timeout",
    metavar="SECONDS",
    default=5.0,
    show_default=True,
    help="Seconds to let live connections finish after SIGTERM/SIGINT before closing them.",
)
@ops_option(
    "pre_drain_delay",
    "--pre-drain-delay",
    metavar="SECONDS",
    default=0.0,
    show_default=True,
    help="After SIGTERM, seconds to keep accepting while /readyz says 503 (for load balancers).",
)
@ops_option(
    "status",
    "--status",
    metavar="HOST:PORT",
    help="Serve /livez, /readyz and /metrics (Prometheus) on this address.  Off by default.",
)
@ops_option(
    "cert_reload_interval",
    "--cert-reload-interval",
    metavar="SECONDS",
    default=10.0,
    show_default=True,
    help="Seconds between checks of cert/key/CAfile/CRL contents; a change is loaded "
    "without a restart (0 = off).",
)
@ops_option(
    "log_format",
    "--log-format",
    metavar="[text|json]",
    default="text",
    show_default=True,
    help="text: stunnel's log lines; json: one object a line.",
)
@ops_option(
    "workers",
    "--workers",
    metavar="N|auto",
    help="Processes serving the same ports (auto: one per usable CPU).  Default: the config's "
    "`workers`, else 1.",
)
@click.option("--print-config", is_flag=True, help="Print the effective stunnel.conf and exit.")
def run(
    config: str | None,
    drain_timeout: float,
    pre_drain_delay: float,
    status: str | None,
    cert_reload_interval: float,
    log_format: str,
    workers: str | None,
    print_config: bool,
) -> None:
    """Run the tunnel described by CONFIG (a stunnel.conf) with secure defaults.

    Client-mode upstreams are verified against the system CA store (or CAfile /
    CApath) and the name in checkHost / sni / connect, unless the service says
    verifyChain = no.  TLS below 1.2 is refused unless configured.

    Without CONFIG, one service comes from the environment, with the variable
    names of the common stunnel images (STUNNEL_SERVICE, STUNNEL_ACCEPT,
    STUNNEL_CONNECT, STUNNEL_CLIENT, STUNNEL_CAFILE, STUNNEL_VERIFY_CHAIN, ...).

    \b
    Examples:
      pytunnel run examples/stunnel.conf
      pytunnel run --status 127.0.0.1:9102 --log-format json examples/stunnel.conf
      STUNNEL_SERVICE=smtps STUNNEL_CLIENT=yes STUNNEL_ACCEPT=127.0.0.1:2525 \\
        STUNNEL_CONNECT=smtp.gmail.com:465 pytunnel run
    """
    source = _source(config)
    if isinstance(source, int):
        sys.exit(source)
    if print_config:
        click.echo(source.text(), nl=False)
        sys.exit(0)
    ops = Ops(
        drain_timeout=drain_timeout,
        pre_drain_delay=pre_drain_delay,
        status=status,
        cert_reload_interval=cert_reload_interval,
        log_format=log_format,
        workers=workers,
    )
    sys.exit(start(Config(source, secure=True, ops=ops)))


@cli.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False), envvar="PYTUNNEL_CONFIG", required=False)
@click.option(
    "--stunnel-defaults",
    is_flag=True,
    help="Check as `pytunnel CONFIG` runs it (stunnel's defaults, no verification by default).",
)
def check(config: str | None, stunnel_defaults: bool) -> None:
    """Validate CONFIG and load its certificates, keys and CAs; bind nothing.

    Exit status 0 when the configuration would start, 1 (stunnel's) when not;
    every problem is printed as FILE:LINE: "line": what is wrong; how to fix.
    Without CONFIG, checks the env-only service (see `pytunnel run --help`).

    \b
    Example:
      pytunnel check examples/stunnel.conf
    """
    source = _source(config)
    if isinstance(source, int):
        sys.exit(source)
    sys.exit(Config(source, secure=not stunnel_defaults).check())


@cli.command(context_settings=CONTEXT)
@ops_option(
    "status",
    "--status",
    metavar="HOST:PORT",
    help="The status address pytunnel serves (its --status / PYTUNNEL_STATUS).",
)
@click.option("--ready", is_flag=True, help="Ask /readyz (503 while draining) instead of /livez.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True)
def healthcheck(status: str | None, ready: bool, timeout: float) -> None:
    """Exit 0 when the running pytunnel answers healthy, 1 when not (Docker, Kubernetes probes).

    \b
    Example (Dockerfile):
      HEALTHCHECK CMD ["pytunnel", "healthcheck"]   # with PYTUNNEL_STATUS set
    """
    if not status:
        click.echo("healthcheck: no status address: pass --status HOST:PORT or set PYTUNNEL_STATUS", err=True)
        sys.exit(1)
    ok, why = probe(status, "/readyz" if ready else "/livez", timeout)
    click.echo(f"{'healthy' if ok else 'unhealthy'}: {why}", err=not ok)
    sys.exit(0 if ok else 1)


@cli.command(context_settings=CONTEXT)
@ops_option(
    "status",
    "--status",
    metavar="HOST:PORT",
    help="The status address pytunnel serves (its --status / PYTUNNEL_STATUS).  "
    "Default: 127.0.0.1:9102, the image's.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between scrapes.",
)
@click.option(
    "--sort",
    type=click.Choice(["n", "a", "c", "b", "f", "e"]),
    default="n",
    show_default=True,
    help="First sort key: n name, a active, c conn/s, b bytes/s, f failures/s, e expiry.",
)
@click.option("--once", is_flag=True, help="Print one screen (two scrapes --interval apart) and exit.")
def top(status: str | None, interval: float, sort: str, once: bool) -> None:
    """A live view of a running pytunnel: per service, connections, bytes/s, failures, expiry.

    Reads the status server's /metrics and /readyz once a second; rates are the change
    between two scrapes.  Keys: n a c b f e sort, q quits (Ctrl-C too).  Needs the `top`
    extra: pip install 'pytunnel[top]'.

    \b
    Examples:
      pytunnel top                          # PYTUNNEL_STATUS, else 127.0.0.1:9102
      pytunnel top --status 127.0.0.1:9200 --sort b
    """
    from tunnel.top import DEFAULT_STATUS
    from tunnel.top import main as top_main

    sys.exit(top_main(status or DEFAULT_STATUS, interval=interval, once=once, sort=sort))


@cli.command(context_settings=CONTEXT)
def version() -> None:
    """Print pytunnel's version and the stunnel-style banner."""
    click.echo(f"pytunnel {__version__}")
    for line in banner():
        click.echo(line)

"""``pytunnel top``: a live terminal view of what a running pytunnel's status server knows.

Theory of operation.  Every ``--interval`` seconds top reads ``/metrics`` (with
prometheus_client's parser) and ``/readyz`` (draining, listening, and ``workers`` from a
``--workers N`` parent, whose answers are already every worker's merged view).  A rate is
one counter's change between the last two scrapes over the time between them: the server
keeps no history and nothing changes on it; a counter that went down (a restart) counts
from zero, as ``rate()`` does.  New connections/s = the change of ended + active.
Handshake quantiles come from the histogram buckets that moved, as ``histogram_quantile``.

The screen is ``rich``'s ``Live`` display, an optional extra (``pytunnel[top]``): rich,
pygments and markdown-it-py would add a third to the core install, which a TLS sidecar
never needs.  Keys are read in cbreak mode: one key sorts or quits; Ctrl-C exits cleanly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from tunnel.addr import parse_endpoint

if TYPE_CHECKING:
    from rich.console import RenderableType

DEFAULT_STATUS = "127.0.0.1:9102"  # the image's PYTUNNEL_STATUS
QUIT_KEYS = frozenset("qQ")  # and below, the sort keys with what the footer calls them
SORT_NAMES = {"n": "name", "a": "active", "c": "conn/s", "b": "bytes/s", "f": "failures/s", "e": "expiry"}


class TopError(Exception):
    """One line for the operator: what did not answer, and why."""


# ------------------------------------------------------------------------------ scraping
@dataclass
class Counters:
    """One service's figures in one scrape (counters as served, not rates)."""

    ended: float = 0.0
    active: float = 0.0
    to_tls: float = 0.0
    to_plain: float = 0.0
    failures: dict[str, float] = field(default_factory=dict)
    not_after: list[float] = field(default_factory=list)


@dataclass
class Scrape:
    at: float  # time.monotonic() when /metrics answered
    version: str = "?"
    ready: bool = False
    draining: bool = False
    workers: int = 1
    started: float | None = None  # process_start_time_seconds (Unix time)
    reloads: dict[str, float] = field(default_factory=dict)
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)
    services: dict[str, Counters] = field(default_factory=dict)
    listening: dict[str, bool] = field(default_factory=dict)  # current services (/readyz)


def parse_metrics(text: str, at: float) -> Scrape:
    """The samples top shows, from one /metrics body.  TopError if it is not pytunnel's."""
    scrape = Scrape(at=at)
    seen = False
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise TopError(f"/metrics is not Prometheus text: {exc}") from None
    for sample in samples:
        name, labels, value = sample.name, sample.labels, float(sample.value)
        row = scrape.services.setdefault(labels["service"], Counters()) if "service" in labels else None
        if name == "pytunnel_info":
            seen, scrape.version = True, labels.get("version", "?")
        elif name == "pytunnel_ready":
            scrape.ready = value == 1
        elif name == "process_start_time_seconds":
            scrape.started = value
        elif name == "pytunnel_reloads_total":
            scrape.reloads[labels["result"]] = value
        elif name == "pytunnel_handshake_seconds_bucket":
            scrape.buckets.append((float(labels["le"]), value))
        elif row is None:
            continue
        elif name == "pytunnel_connections_total":
            row.ended += value
        elif name == "pytunnel_connections_active":
            row.active = value
        elif name == "pytunnel_bytes_total" and labels.get("direction") in ("to_tls", "to_plain"):
            setattr(row, labels["direction"], value)
        elif name == "pytunnel_handshake_failures_total":
            row.failures[labels["reason"]] = value
        elif name == "pytunnel_cert_not_after_seconds":
            row.not_after.append(value)
    if not seen:
        raise TopError("this status server's /metrics has no pytunnel_info: is it pytunnel's?")
    scrape.buckets.sort()
    return scrape


def apply_readyz(scrape: Scrape, doc: dict[str, Any]) -> None:
    scrape.draining = bool(doc.get("draining", False))
    scrape.workers = int(doc.get("workers", 1))
    for svc in doc.get("services", []):
        scrape.listening[str(svc["name"])] = bool(svc.get("listening"))


def base_url(address: str) -> str:
    """``HOST:PORT`` (as --status takes it) -> the status server's URL; loopback for a wildcard."""
    ep = parse_endpoint(address)
    if ep.path is not None:
        raise TopError(f"{address!r}: the status server listens on TCP (expected HOST:PORT)")
    host = ep.host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - a wildcard: ask loopback
    return f"http://[{host}]:{ep.port}" if ":" in host else f"http://{host}:{ep.port}"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy


def _get(url: str, timeout: float) -> bytes:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # /readyz while not ready: the body still says why
            return bytes(exc.read())
        raise TopError(f"{url} answered {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        why = getattr(why, "strerror", None) or why
        raise TopError(f"nothing answers at {url} ({why}): is pytunnel running with --status?") from None


def fetch(base: str, timeout: float = 3.0) -> Scrape:
    scrape = parse_metrics(_get(f"{base}/metrics", timeout).decode("utf-8", "replace"), time.monotonic())
    try:
        doc = json.loads(_get(f"{base}/readyz", timeout))
    except ValueError:
        raise TopError(f"{base}/readyz is not JSON: is this pytunnel's status server?") from None
    apply_readyz(scrape, doc)
    return scrape


# --------------------------------------------------------------------------------- rates
def per_second(old: float, new: float, seconds: float) -> float:
    """A counter's rate between two scrapes; a counter that went down restarted from zero."""
    return ((new - old) if new >= old else new) / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Row:
    name: str
    state: str  # ready | not ready | draining | removed
    active: int
    conns: float | None  # new connections per second (None: one scrape so far)
    to_tls: float | None  # bytes per second written into TLS
    to_plain: float | None  # bytes per second written to the plain side
    failures: dict[str, float]  # handshake failures per second, by reason (moving ones)
    failed: float  # handshake failures so far
    days: float | None  # the service's soonest certificate expiry, in days


def _state(cur: Scrape, name: str) -> str:
    if name not in cur.listening:
        return "removed"
    if cur.draining:
        return "draining"
    return "ready" if cur.listening[name] and cur.ready else "not ready"


def rows(prev: Scrape | None, cur: Scrape, now: float) -> list[Row]:
    """Per service: rates between ``prev`` and ``cur``; ``now`` (Unix time) for certificate days."""
    out = []
    for name, c in cur.services.items():
        days = (min(c.not_after) - now) / 86400 if c.not_after else None
        conns = to_tls = to_plain = None
        failures: dict[str, float] = {}
        if prev is not None:
            p, dt = prev.services.get(name, Counters()), cur.at - prev.at
            conns = per_second(p.ended + p.active, c.ended + c.active, dt)
            to_tls, to_plain = per_second(p.to_tls, c.to_tls, dt), per_second(p.to_plain, c.to_plain, dt)
            failures = {r: per_second(p.failures.get(r, 0), v, dt) for r, v in c.failures.items()}
        moving = {r: v for r, v in failures.items() if v > 0}
        failed = sum(c.failures.values())
        out.append(Row(name, _state(cur, name), int(c.active), conns, to_tls, to_plain, moving, failed, days))
    return out


def sort_rows(table: list[Row], key: str) -> list[Row]:
    def rate(value: float | None) -> float:
        return -1.0 if value is None else value

    keys = {
        "n": lambda r: (r.name,),
        "a": lambda r: (-r.active, r.name),
        "c": lambda r: (-rate(r.conns), r.name),
        "b": lambda r: (-rate(r.to_tls) - rate(r.to_plain), r.name),
        "f": lambda r: (-sum(r.failures.values()), -r.failed, r.name),
        "e": lambda r: (math.inf if r.days is None else r.days, r.name),
    }
    return sorted(table, key=keys.get(key, keys["n"]))


def quantile(q: float, prev: list[tuple[float, float]], cur: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile(q, ...)`` over the handshakes observed between two scrapes."""
    old = dict(prev)
    moved = [(le, n - old.get(le, 0.0)) for le, n in cur]
    if prev and cur and cur[-1][1] < prev[-1][1]:  # restarted: everything counts
        moved = list(cur)
    if not moved or moved[-1][1] <= 0:
        return None
    rank = q * moved[-1][1]
    lower, below = 0.0, 0.0
    for le, count in moved:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower


# ------------------------------------------------------------------------------- screen
@dataclass(frozen=True)
class View:
    address: str
    cur: Scrape
    prev: Scrape | None = None
    sort: str = "n"
    error: str | None = None


def human_rate(value: float | None) -> str:
    if value is None or value < 1024:
        return "…" if value is None else f"{value:.0f} B/s"
    for prefix in ("Ki", "Mi", "Gi"):  # noqa: B007 - the last one is used below
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {prefix}B/s"


def _uptime(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def process_line(view: View, now: float) -> str:
    cur, prev = view.cur, view.prev
    state = (
        "UNREACHABLE" if view.error else "draining" if cur.draining else "ready" if cur.ready else "NOT READY"
    )
    parts = [f"pytunnel {cur.version} at {view.address}", state]
    if cur.started is not None:
        parts.append(f"up {_uptime(now - cur.started)}")
    parts.append(f"workers {cur.workers}")
    parts.append(
        f"reloads {cur.reloads.get('success', 0):.0f} ok, {cur.reloads.get('failure', 0):.0f} failed"
    )
    if prev is not None and cur.buckets:
        done = per_second(prev.buckets[-1][1] if prev.buckets else 0, cur.buckets[-1][1], cur.at - prev.at)
        times = [quantile(q, prev.buckets, cur.buckets) for q in (0.5, 0.99)]
        shown = " | ".join(f"{n} {t * 1000:.1f} ms" for n, t in zip(("p50", "p99"), times, strict=True) if t)
        return " | ".join(parts) + f"\nhandshakes {done:.1f}/s" + (f" | {shown}" if shown else "")
    return " | ".join(parts)


def _failures(row: Row) -> str:
    if row.conns is None:
        return "…"
    moving = ", ".join(f"{reason} {rate:.1f}" for reason, rate in sorted(row.failures.items()))
    return moving or ("0" if not row.failed else f"0 ({row.failed:.0f} so far)")


def render(view: View, now: float | None = None) -> RenderableType:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    header = Text(process_line(view, now), style="bold")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold reverse")
    for title in ("SERVICE", "STATE", "ACTIVE", "CONN/S", "TO TLS", "TO PLAIN", "HS FAIL/S", "CERT DAYS"):
        left = title in ("SERVICE", "STATE", "HS FAIL/S")
        table.add_column(title, justify="left" if left else "right", no_wrap=title != "HS FAIL/S")
    states = {"ready": "green", "draining": "yellow", "not ready": "bold red", "removed": "dim"}
    for row in sort_rows(rows(view.prev, view.cur, now), view.sort):
        days = "-" if row.days is None else f"{row.days:.1f}"
        urgency = "" if row.days is None or row.days >= 14 else "yellow" if row.days >= 2 else "bold red"
        table.add_row(
            row.name,
            Text(row.state, style=states[row.state]),
            str(row.active),
            "…" if row.conns is None else f"{row.conns:.1f}",
            human_rate(row.to_tls),
            human_rate(row.to_plain),
            Text(_failures(row), style="red" if row.failures else ""),
            Text(days, style=urgency),
        )
    keys = "  ".join(f"{k} {name}" for k, name in SORT_NAMES.items())
    footer = Text(f"sorted by {SORT_NAMES.get(view.sort, 'name')}   keys: {keys}  q quit", style="dim")
    error = [Text(f"last scrape failed: {view.error}", style="bold red")] if view.error else []
    return Group(header, *error, table, footer)


# --------------------------------------------------------------------------------- loop
class Keys:
    """Single keys from the terminal (cbreak: no Enter, Ctrl-C still interrupts)."""

    def __enter__(self) -> Keys:
        self.fd = self.tty = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved = None if self.tty is None else termios.tcgetattr(self.tty)
        if self.tty is not None:
            tty.setcbreak(self.tty)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tty is not None and self.saved is not None:
            termios.tcsetattr(self.tty, termios.TCSADRAIN, self.saved)

    def wait(self, timeout: float) -> str:
        """The keys pressed within ``timeout`` (returns at the first), or '' when none."""
        if self.fd is None:
            time.sleep(max(timeout, 0.0))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # end of input: no more keys, keep refreshing
            self.fd = None
        return data.decode("utf-8", "ignore")


def _step(view: View, base: str) -> View:
    try:
        return replace(view, prev=view.cur, cur=fetch(base), error=None)
    except TopError as exc:
        return replace(view, error=str(exc))


def _live(view: View, base: str, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    with Keys() as keys, Live(console=Console(), screen=True, auto_refresh=False) as live:
        live.update(render(view), refresh=True)
        due = time.monotonic() + interval
        while True:
            for key in keys.wait(due - time.monotonic()):
                if key in QUIT_KEYS:
                    return 0
                if key in SORT_NAMES:
                    view = replace(view, sort=key)
                    live.update(render(view), refresh=True)
            if time.monotonic() >= due:
                due = max(due + interval, time.monotonic() + interval / 2)
                view = _step(view, base)
                live.update(render(view), refresh=True)


def main(address: str, interval: float = 1.0, once: bool = False, sort: str = "n") -> int:
    """``pytunnel top``: 0 on q or Ctrl-C, 1 when nothing answers at ``address`` at start."""
    if importlib.util.find_spec("rich") is None:
        print("pytunnel top needs rich: pip install 'pytunnel[top]'", file=sys.stderr)
        return 1
    try:
        base = base_url(address)
        view = View(address=address, cur=fetch(base), sort=sort)
        if once:
            time.sleep(interval)
            view = _step(view, base)
            from rich.console import Console

            Console().print(render(view))
            return 0 if view.error is None else 1
        return _live(view, base, interval)
    except TopError as exc:
        print(f"pytunnel top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0

"""`pytunnel top`, as a person uses it: a real tunnel with traffic flowing, `pytunnel top` in a
real terminal (tmux), the screen read back with `tmux capture-pane`, keys sent with
`tmux send-keys`; plus its one-line error, a --workers parent, and the rate arithmetic.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, TunnelFactory, need_tool, pytunnel_cmd
from loopback_support import free_port
from monitoring_support import Traffic, poll, start_with_status

from tunnel.top import Counters, Scrape, per_second, quantile, rows, sort_rows


class Tmux:
    """A private tmux server (its own socket, no ~/.tmux.conf) whose panes run commands."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="pytunnel-tmux-"))  # short: socket paths are limited
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTUNNEL_", "TMUX"))}
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, "-S", str(self.dir / "sock"), "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def run(self, name: str, argv: list[str]) -> Path:
        """Run ``argv`` in a 150x40 pane; returns the file that will hold its exit status and,
        after it, the terminal's settings (`stty -a`), to show they were restored."""
        after = self.dir / f"{name}.exit"
        command = f"{shlex.join(argv)}; echo $? > {after}.tmp; stty -a >> {after}.tmp; mv {after}.tmp {after}"
        self.tmux("new-session", "-d", "-s", name, "-x", "150", "-y", "40", "-c", str(ROOT), command)
        return after

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name)

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", name, *keys)

    def close(self) -> None:
        subprocess.run(
            [self.binary, "-S", str(self.dir / "sock"), "kill-server"], capture_output=True, timeout=30
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    session = Tmux(need_tool("tmux", "tmux"))
    yield session
    session.close()


def service_row(screen: str, name: str) -> list[str] | None:
    """The cells of a service's row: name, state, active, conn/s, to-TLS value + unit, ..."""
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    return None


def moving(screen: str, name: str, active: int) -> bool:
    """``name``'s row shows ``active`` connections and a non-zero bytes/s into TLS."""
    cells = service_row(screen, name)
    if cells is None or len(cells) < 8 or cells[2] != str(active) or cells[4] == "…":
        return False
    return float(cells[4]) > 0 and cells[5].endswith("B/s")


def wait_screen(tmux: Tmux, what: str, ok: Callable[[str], bool]) -> str:
    def check() -> str | None:
        screen = tmux.screen("top")
        return screen if ok(screen) else None

    return poll(what, check)


def wait_exit(after: Path) -> tuple[int, str]:
    """The exit status of the pane's command, and `stty -a` after it (the terminal restored?)."""
    poll("pytunnel top to exit", lambda: after.exists() or None, timeout=30)
    status, _, stty = after.read_text().partition("\n")
    return int(status), stty


def restored(stty: str) -> bool:
    return " icanon " in f" {stty} " and " echo " in f" {stty} "


def churning(screen: str) -> bool:
    cells = service_row(screen, "mailgw")
    return cells is not None and cells[3] != "…" and float(cells[3]) > 0 and "protocol_error" in cells


@pytest.mark.timeout(300)  # several waits of up to 60 s each on a loaded machine
def test_top_in_a_terminal_shows_traffic_moving_sorts_and_quits(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmux: Tmux
) -> None:
    t, addr = start_with_status(
        tunnels,
        "".join(
            f"[{name}]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            for name in ("webfront", "mailgw")
        ),
    )
    traffic = Traffic(certs.ca_pem)
    try:
        traffic.stream(t.port("webfront"))
        traffic.stream(t.port("webfront"))
        traffic.churn(t.port("mailgw"))
        after = tmux.run("top", pytunnel_cmd("top", "--status", addr))
        first = wait_screen(tmux, "webfront: 2 active, bytes/s > 0", lambda s: moving(s, "webfront", 2))
        print(f"\n--- pytunnel top, two streams:\n{first}")
        assert f"pytunnel 0.1.0 at {addr} | ready | up " in first and "workers 1" in first
        traffic.stream(t.port("webfront"))
        traffic.stream(t.port("webfront"))
        second = wait_screen(tmux, "webfront: 4 active", lambda s: moving(s, "webfront", 4))
        print(f"--- four streams:\n{second}")
        assert second != first
        churn = wait_screen(tmux, "mailgw: new connections/s and protocol_error failures/s", churning)
        print(f"--- mailgw churning:\n{churn}")
        tmux.keys("top", "b")
        wait_screen(
            tmux,
            "sorted by bytes/s, webfront first",
            lambda s: "sorted by bytes/s" in s and s.index("webfront ") < s.index("mailgw "),
        )
        tmux.keys("top", "q")
        status, stty = wait_exit(after)
        assert status == 0
        assert restored(stty), f"terminal not restored:\n{stty}"
    finally:
        traffic.stop()
    assert t.stop() == 0


def test_ctrl_c_exits_cleanly(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmux: Tmux) -> None:
    t, addr = start_with_status(
        tunnels, f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    after = tmux.run("top", pytunnel_cmd("top", "--status", addr, "--sort", "a"))
    wait_screen(tmux, "the srv row", lambda s: service_row(s, "srv") is not None)
    tmux.keys("top", "C-c")
    status, stty = wait_exit(after)
    assert status == 0
    assert restored(stty), f"terminal not restored:\n{stty}"
    assert t.stop() == 0


def test_one_line_when_nothing_listens() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTUNNEL_")}
    env["PYTHONPATH"] = str(ROOT)
    for args, extra in (
        (["--status", f"127.0.0.1:{port}"], {}),
        ([], {"PYTUNNEL_STATUS": f"127.0.0.1:{port}"}),
    ):
        out = subprocess.run(
            pytunnel_cmd("top", *args), env=env | extra, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1, out
        assert out.stdout == ""
        assert out.stderr.count("\n") == 1, out.stderr
        assert f"nothing answers at http://127.0.0.1:{port}/metrics (Connection refused)" in out.stderr
    # neither: the image's address (whatever is there, the output names it)
    out = subprocess.run(
        pytunnel_cmd("top", "--once", "--interval", "0.1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "127.0.0.1:9102" in out.stdout + out.stderr
    bad = subprocess.run(pytunnel_cmd("top", "--status", "/x.sock"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_once_against_a_workers_parent_shows_the_merged_view(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    t, addr = start_with_status(
        tunnels,
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n",
        PYTUNNEL_WORKERS="2",
    )
    traffic = Traffic(certs.ca_pem)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "150"}
    try:
        traffic.stream(t.port("srv"))
        traffic.stream(t.port("srv"))

        def screen() -> str:
            out = subprocess.run(
                pytunnel_cmd("top", "--status", addr, "--once"), env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, out.stderr
            return out.stdout if moving(out.stdout, "srv", 2) else ""

        text = poll("srv: 2 active over both workers, bytes/s > 0", screen)
        print(f"\n{text}")
        assert "workers 2" in text and "| ready |" in text
    finally:
        traffic.stop()
    assert t.stop() == 0


# ------------------------------------------------------------------ the arithmetic


def test_rates_are_differences_of_two_scrapes() -> None:
    assert per_second(100, 300, 2.0) == 100
    assert per_second(500, 40, 2.0) == 20  # a restart: counts from zero
    assert per_second(1, 2, 0) == 0
    old = Scrape(at=10.0, services={"a": Counters(ended=10, active=2, to_tls=1000, failures={"timeout": 1})})
    new = Scrape(
        at=12.0,
        listening={"a": True},
        ready=True,
        services={
            "a": Counters(ended=14, active=3, to_tls=5096, to_plain=10, failures={"timeout": 3}),
            "b": Counters(not_after=[86400 * 3.0, 86400 * 30.0]),
        },
    )
    a, b = sort_rows(rows(old, new, now=0.0), "n")
    assert (a.name, a.state, a.active, a.conns, a.to_tls, a.to_plain) == ("a", "ready", 3, 2.5, 2048, 5)
    assert a.failures == {"timeout": 1.0} and a.failed == 3
    assert (b.name, b.state, b.days, b.conns) == ("b", "removed", 3.0, 0.0)
    assert [r.name for r in sort_rows(rows(old, new, 0.0), "e")] == ["b", "a"]
    assert all(r.conns is None for r in rows(None, new, 0.0))


def test_handshake_quantiles_from_the_buckets_that_moved() -> None:
    inf = float("inf")
    prev = [(0.01, 5.0), (0.1, 5.0), (1.0, 5.0), (inf, 5.0)]
    cur = [(0.01, 5.0), (0.1, 15.0), (1.0, 25.0), (inf, 25.0)]  # 10 in (0.01, 0.1], 10 in (0.1, 1]
    assert quantile(0.5, prev, cur) == pytest.approx(0.1)
    assert quantile(0.25, prev, cur) == pytest.approx(0.055)
    assert quantile(0.5, cur, cur) is None  # nothing moved
    assert quantile(0.99, [], [(0.1, 0.0), (inf, 4.0)]) == 0.1  # all above the last bound

"""Env-only single service, with both popular stunnel images' variable names."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, pytunnel_cmd

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("STUNNEL_", "PYTUNNEL_"))}


def env_of(**extra: str) -> dict[str, str]:
    return dict(CLEAN, PYTHONPATH=str(ROOT), **extra)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pytunnel_cmd(*args),
        env=env_of(**env),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def start(tmp_path: Path, **env: str) -> Tunnel:
    log = tmp_path / "env.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(pytunnel_cmd("run"), env=env_of(**env), stdout=fh, stderr=subprocess.STDOUT)
    t = Tunnel(proc=proc, log_path=log)
    m = t.wait_for(r"Service \[(\w+)\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)$")
    t.ports[m.group(1)] = [int(m.group(2))]
    return t


def tls_echo(port: int, certs: Certs) -> bytes:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"from env")
        return s.recv(8)


@pytest.mark.parametrize(
    "image",
    [
        {"STUNNEL_SERVICE": "web", "STUNNEL_CRT": "{cert}", "STUNNEL_KEY": "{cert}"},  # dweomer/stunnel
        {"STUNNEL_SERVICE_NAME": "web", "STUNNEL_CERT": "{cert}"},  # SUSE
    ],
    ids=["dweomer", "suse"],
)
def test_env_only_server(tmp_path: Path, certs: Certs, echo: EchoServer, image: dict[str, str]) -> None:
    env = {k: v.replace("{cert}", str(certs.server_pem)) for k, v in image.items()}
    t = start(tmp_path, STUNNEL_ACCEPT="127.0.0.1:0", STUNNEL_CONNECT=f"127.0.0.1:{echo.port}", **env)
    try:
        assert tls_echo(t.ports["web"][0], certs) == b"from env"
        assert "Reading configuration from file environment" in t.log
    finally:
        assert t.stop() == 0


def test_env_only_client_verifies_with_the_given_ca(tmp_path: Path, certs: Certs, echo: EchoServer) -> None:
    (tmp_path / "s").mkdir()
    server = start(
        tmp_path / "s",
        STUNNEL_SERVICE="srv", STUNNEL_ACCEPT="127.0.0.1:0", STUNNEL_CONNECT=f"127.0.0.1:{echo.port}",
        STUNNEL_CRT=str(certs.server_pem), STUNNEL_KEY=str(certs.server_pem),
    )  # fmt: skip
    try:
        client = start(
            tmp_path,
            STUNNEL_SERVICE="cli", STUNNEL_CLIENT="yes", STUNNEL_ACCEPT="127.0.0.1:0",
            STUNNEL_CONNECT=f"localhost:{server.ports['srv'][0]}", STUNNEL_CAFILE=str(certs.ca_pem),
        )  # fmt: skip
        try:
            with socket.create_connection(("127.0.0.1", client.ports["cli"][0]), timeout=10) as s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
            client.wait_for(r"TLS connected: new session negotiated")
        finally:
            client.stop()
    finally:
        server.stop()


def test_print_config_shows_the_effective_file() -> None:
    out = cli(
        "run", "--print-config",
        STUNNEL_SERVICE="smtps", STUNNEL_CLIENT="yes", STUNNEL_ACCEPT="127.0.0.1:2525",
        STUNNEL_CONNECT="smtp.gmail.com:465", STUNNEL_DELAY="yes", STUNNEL_UID="nobody",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "[smtps]" in lines
    assert lines.index("setuid = nobody") < lines.index("[smtps]")
    for line in ("accept = 127.0.0.1:2525", "connect = smtp.gmail.com:465", "client = yes", "delay = yes"):
        assert line in lines[lines.index("[smtps]") :]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STUNNEL_CLIENT": "maybe"}, 'environment variable STUNNEL_CLIENT: "client = maybe"'),
        ({"STUNNEL_CONNECT": "smtp.example"}, "environment variable STUNNEL_CONNECT: "),
        ({"STUNNEL_PROTOCOL": "gopher"}, "environment variable STUNNEL_PROTOCOL: "),
        ({"STUNNEL_CLIENT": "no"}, "set STUNNEL_CRT (and STUNNEL_KEY), or STUNNEL_CLIENT=yes"),
        ({"STUNNEL_CONNECT": "1.2.3.4:1\nexec = /bin/sh"}, "STUNNEL_CONNECT: a value must be one line"),
        ({"STUNNEL_CONNECT": ""}, "STUNNEL_CONNECT not set"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], needle: str) -> None:
    base = {
        "STUNNEL_SERVICE": "x",
        "STUNNEL_CLIENT": "yes",
        "STUNNEL_ACCEPT": "127.0.0.1:0",
        "STUNNEL_CONNECT": "127.0.0.1:9",
    }
    base.update(env)
    out = cli("check", **base)
    assert out.returncode == 1
    assert needle in out.stderr, out.stderr
    assert out.stderr.rstrip().endswith("Configuration failed")


def test_no_config_and_no_environment_is_a_usage_error() -> None:
    out = cli("run")
    assert out.returncode == 2
    assert "STUNNEL_SERVICE" in out.stderr


def test_a_certificate_problem_names_the_variable(tmp_path: Path) -> None:
    out = cli(
        "check",
        STUNNEL_SERVICE="web", STUNNEL_ACCEPT="127.0.0.1:0", STUNNEL_CONNECT="127.0.0.1:9",
        STUNNEL_CRT=str(tmp_path / "missing.pem"),
    )  # fmt: skip
    assert out.returncode == 1
    assert f'environment variable STUNNEL_CRT: "cert = {tmp_path / "missing.pem"}"' in out.stderr, out.stderr
    assert "environment:" not in out.stderr

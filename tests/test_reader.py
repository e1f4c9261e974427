"""The stunnel.conf reader, from files on disk: every construct stunnel's parser accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel import conf
from tunnel.addr import Endpoint, parse_endpoint
from tunnel.errors import ConfigError
from tunnel.settings import Settings

GOOD = "[s]\nclient = yes\naccept = 127.0.0.1:2525\nconnect = 10.0.0.1:465\n"


def load(tmp_path: Path, text: str | bytes, name: str = "stunnel.conf") -> Settings:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return conf.load(str(path))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    return [p.render() for p in err.value.problems]


def test_comments_blank_and_indented_lines(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "; a comment\n# another\n\n   foreground = yes   \n[s]\n\t client = yes\n  accept = 2525\n   connect = 465\n",
    )
    assert s.globals.foreground == "yes"
    svc = s.services[0]
    assert svc.client is True
    assert svc.accept == [Endpoint(None, 2525)]
    assert svc.connect == [Endpoint(None, 465)]


def test_utf8_bom_and_crlf(tmp_path: Path) -> None:
    s = load(tmp_path, b"\xef\xbb\xbf[s]\r\nclient = yes\r\naccept = 1\r\nconnect = 2\r\n")
    assert s.services[0].name == "s"


def test_option_names_are_case_insensitive(tmp_path: Path) -> None:
    s = load(tmp_path, "[s]\nCLIENT = yes\nAccept = 1\nCONNECT = 2\ncafile = /x.pem\ntimeoutIDLE = 5\n")
    svc = s.services[0]
    assert svc.CAfile == "/x.pem" and svc.TIMEOUTidle == 5


def test_aliases_curve_and_session(tmp_path: Path) -> None:
    s = load(tmp_path, GOOD + "curve = prime256v1\nsession = 300\n")
    assert s.services[0].curves == "prime256v1"
    assert s.services[0].sessionCacheTimeout == 300


def test_repeatable_options_keep_their_order(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "[s]\nclient = yes\naccept = 1\naccept = 2\nconnect = b:2\nconnect = a:1\n"
        "checkHost = z.example\ncheckHost = a.example\nverifyChain = yes\nCAfile = /ca\n"
        "socket = l:SO_KEEPALIVE=yes\nsocket = r:TCP_KEEPIDLE=30\noptions = NO_TICKET\noptions = -NO_TICKET\n",
    )
    svc = s.services[0]
    assert [e.port for e in svc.accept] == [1, 2]
    assert [e.host for e in svc.connect] == ["b", "a"]
    assert svc.checkHost == ["z.example", "a.example"]
    assert [(o.where, o.name, o.value) for o in svc.socket] == [
        ("l", "SO_KEEPALIVE", 1),
        ("r", "TCP_KEEPIDLE", 30),
    ]
    assert svc.options == ["NO_TICKET", "-NO_TICKET"]


def test_global_service_options_are_defaults_for_every_service(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "client = yes\nTIMEOUTidle = 7\nsocket = l:SO_KEEPALIVE=yes\n"
        "[a]\naccept = 1\nconnect = 2\n"
        "[b]\naccept = 3\nconnect = 4\nTIMEOUTidle = 9\nsocket = r:SO_KEEPALIVE=yes\n",
    )
    a, b = s.services
    assert a.client and b.client
    assert a.TIMEOUTidle == 7 and b.TIMEOUTidle == 9
    assert [o.where for o in a.socket] == ["l"]
    assert [o.where for o in b.socket] == ["l", "r"]


def test_include_reads_a_directory_in_name_order(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    inc.mkdir()
    (inc / "20-b.conf").write_text("[b]\nclient = yes\naccept = 3\nconnect = 4\n")
    (inc / "10-a.conf").write_text("[a]\nclient = yes\naccept = 1\nconnect = 2\n")
    s = load(tmp_path, "foreground = yes\ninclude = conf.d\n")
    assert [svc.name for svc in s.services] == ["a", "b"]


def test_errors_in_included_files_name_that_file(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    inc.mkdir()
    (inc / "a.conf").write_text("[a]\nclient = yes\naccept = 1\nconect = 2\n")
    out = problems(tmp_path, f"include = {inc}\n")
    assert any(f'{inc / "a.conf"}:4: "conect = 2"' in p for p in out), out


def test_no_section_means_inetd_mode(tmp_path: Path) -> None:
    s = load(tmp_path, "client = yes\nconnect = 127.0.0.1:465\nservice = moo\n")
    assert s.inetd is True
    assert s.services[0].name == "moo"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("2525", None, 2525),
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("::1:0", "::1", 0),
        ("[::1]:443", "::1", 443),
        (":::8443", "::", 8443),
        ("smtp.gmail.com:465", "smtp.gmail.com", 465),
        ("localhost:smtps", "localhost", 465),
    ],
)
def test_addresses(text: str, host: str | None, port: int) -> None:
    ep = parse_endpoint(text)
    assert (ep.host, ep.port, ep.path) == (host, port, None)


def test_unix_socket_address() -> None:
    assert parse_endpoint("/run/app.sock").path == "/run/app.sock"


@pytest.mark.parametrize("text", ["smtp.gmail.com", "host:", "1.2.3.4:99999", "[::1]443", "[nothost]:1", ""])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_every_problem_has_file_line_and_the_line(tmp_path: Path) -> None:
    body = "[s]\nclient = yes\naccept = 1\nconnect = 2\nTIMEOUTidle = soon\n"
    with pytest.raises(ConfigError) as err:
        load(tmp_path, body)
    (p,) = err.value.problems
    assert p.file == str(tmp_path / "stunnel.conf") and p.line == 5 and p.text == "TIMEOUTidle = soon"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[s]\nclient = yes\naccept = 1\nconect = 2\n", 'did you mean "connect"?'),
        ("[s]\nclient = yes\naccept = 1\n", "Each service must define two endpoints"),
        ("[s]\nclient = maybe\naccept = 1\nconnect = 2\n", "The argument needs to be either 'yes' or 'no'"),
        ("[s]\naccept = 1\nconnect = 2\n", "TLS server needs a certificate"),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\nverifyChain = yes\n",
            '"CAfile" or "CApath" has to be configured',
        ),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\ncheckHost = a\n",
            '"verifyChain" or "verifyPeer" has to be enabled',
        ),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\nsslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.2\n",
            "Invalid protocol version range",
        ),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\noptions = NO_TIKET\n", "did you mean NO_TICKET?"),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\nsocket = l:TCP_NODELAI=1\n",
            "did you mean TCP_NODELAY?",
        ),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\nsocket = a:SO_EXCLUSIVEADDRUSE=yes\n",
            "only on Windows",
        ),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\npid = /x\n", "global option"),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\n[s]\nclient = yes\naccept = 3\nconnect = 4\n",
            "duplicate section",
        ),
        ("engine = auto\n[s]\nclient = yes\naccept = 1\nconnect = 2\n", "OpenSSL engines"),
        ("fips = yes\n[s]\nclient = yes\naccept = 1\nconnect = 2\n", "FIPS support is not available"),
        ("taskbar = yes\n[s]\nclient = yes\naccept = 1\nconnect = 2\n", "Windows"),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\nOCSP = http://x\n", "OCSP"),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\nexec = /bin/cat\n", "not implement"),
        (
            "[s]\nclient = yes\naccept = 1\nconnect = 2\nciphersuites = TLS_AES_128_GCM_SHA256\n",
            "ciphersuites",
        ),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\nTIMEOUTclose = -1\n", "non-negative"),
        ("[s]\nclient = yes\naccept = 1\nconnect = 2\nfailover = random\n", "rr, prio"),
        ("[s\n", "malformed section header"),
        ("just words\n", 'expected "option = value"'),
    ],
)
def test_rejections_say_why(tmp_path: Path, body: str, needle: str) -> None:
    out = problems(tmp_path, body)
    assert any(needle in p for p in out), out
    assert all(str(tmp_path) in p for p in out), out


def test_off_values_of_unsupported_options_are_accepted(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "fips = no\n[s]\nclient = yes\naccept = 1\nconnect = 2\nOCSPaia = no\nlibwrap = no\npty = no\n",
    )
    assert len(s.services) == 1


def test_all_errors_are_collected_and_sorted(tmp_path: Path) -> None:
    out = problems(
        tmp_path,
        "[a]\nclient = maybe\naccept = 1\nconnect = 2\n[b]\nclient = yes\naccept = x:y:z\nconnect = 4\nTIMEOUTbusy = q\n",
    )
    lines = [int(p.split(":")[1]) for p in out]
    assert lines == sorted(lines) and {2, 7, 9} <= set(lines), out


def test_defaults_match_stunnel(tmp_path: Path) -> None:
    svc = load(tmp_path, GOOD).services[0]
    assert (svc.TIMEOUTbusy, svc.TIMEOUTclose, svc.TIMEOUTconnect, svc.TIMEOUTidle) == (300, 60, 10, 43200)
    assert svc.ciphers == "HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK"
    assert svc.curves == "X25519:P-256:X448:P-521:P-384"
    assert (svc.failover, svc.reset, svc.sessionResume, svc.securityLevel) == ("prio", True, True, 2)
    assert svc.debug == ("daemon", 5)


def test_debug_levels_by_number_name_and_facility(tmp_path: Path) -> None:
    assert load(tmp_path, "debug = 7\n" + GOOD).log_level == 7
    assert load(tmp_path, "debug = warning\n" + GOOD).log_level == 4
    s = load(tmp_path, "debug = local3.info\n" + GOOD)
    assert s.defaults.debug == ("local3", 6)

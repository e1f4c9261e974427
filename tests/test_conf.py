"""The stunnel.conf reader (tunnel/conf.py + tunnel/settings.py), from real files on disk.

Each test writes a configuration into ``tmp_path`` and loads it with ``conf.load``, the
same entry point ``pytunnel CONFIG`` and ``pytunnel check`` use.  Expected texts are
stunnel 5.68's own where tools grep them (observed with Debian's stunnel4).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tunnel import conf, rules
from tunnel.addr import Endpoint
from tunnel.errors import ConfigError, Problem
from tunnel.settings import ServiceSettings, Settings

CLIENT = "[s]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def load(tmp_path: Path, text: str | bytes, name: str = "stunnel.conf") -> Settings:
    return conf.load(str(write(tmp_path / name, text)))


def fail(tmp_path: Path, text: str | bytes, name: str = "stunnel.conf") -> list[Problem]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text, name)
    assert err.value.problems, "ConfigError without problems"
    return err.value.problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [p.render() for p in problems]
    return problems[0]


def service(s: Settings, name: str = "s") -> ServiceSettings:
    found = [svc for svc in s.services if svc.name == name]
    assert len(found) == 1, [svc.name for svc in s.services]
    return found[0]


# ----------------------------------------------------------------- file layout


def test_global_section_then_service_sections(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "foreground = yes\nsyslog = no\noutput = /tmp/x.log\n"
        "[first]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"
        "[second]\ncert = /srv/server.pem\naccept = 0\nconnect = 9\n",
    )
    assert s.inetd is False
    assert (s.globals.foreground, s.globals.syslog, s.globals.output) == ("yes", False, "/tmp/x.log")
    assert [svc.name for svc in s.services] == ["first", "second"]
    first, second = s.services
    assert first.client is True and first.cert is None
    assert first.accept == [Endpoint("127.0.0.1", 0)] and first.connect == [Endpoint("127.0.0.1", 9)]
    # options do not leak from one section into the next
    assert second.client is False and second.cert == "/srv/server.pem"
    assert second.accept == [Endpoint(None, 0)] and second.connect == [Endpoint(None, 9)]


def test_semicolon_and_hash_comments_anywhere_a_line_starts(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "; stunnel comment\n# shell comment\n  ; indented\n\t# tab-indented\n"
        "; pid = /nonexistent/forbidden-here-but-commented\n"
        "[s]\n; client = no\nclient = yes\n# [other]\naccept = 127.0.0.1:0\n"
        "#connect = 10.0.0.1:1\nconnect = 127.0.0.1:9\n;;;\n##\n",
    )
    assert [svc.name for svc in s.services] == ["s"]
    svc = service(s)
    assert svc.client is True
    assert svc.connect == [Endpoint("127.0.0.1", 9)]


def test_comment_characters_inside_a_value_are_part_of_it(tmp_path: Path) -> None:
    # stunnel has no trailing comments: only a line *starting* with ; or # is a comment
    svc = service(load(tmp_path, CLIENT + "sni = mail#1.example\n"))
    assert svc.sni == "mail#1.example"
    p = only(fail(tmp_path, CLIENT + "TIMEOUTidle = 5 ; five seconds\n"))
    assert (p.line, p.text) == (5, "TIMEOUTidle = 5 ; five seconds")


def test_blank_and_indented_lines_and_spacing_around_equals(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "\n\n   \n\t\n  foreground=yes\n\t syslog   =   no  \n"
        "   [s]   \n\tclient= yes\n  accept =127.0.0.1:0\t\n\n      connect  =  127.0.0.1:9   \n\n",
    )
    assert (s.globals.foreground, s.globals.syslog) == ("yes", False)
    svc = service(s)
    assert svc.client is True
    assert svc.accept == [Endpoint("127.0.0.1", 0)] and svc.connect == [Endpoint("127.0.0.1", 9)]


def test_crlf_line_endings(tmp_path: Path) -> None:
    s = load(tmp_path, CLIENT.replace("\n", "\r\n").encode() + b"TIMEOUTidle = 7\r\n")
    assert service(s).TIMEOUTidle == 7


def test_utf8_bom_before_the_first_option(tmp_path: Path) -> None:
    # the first line is an option, not a comment: it only parses if the BOM is dropped
    s = load(tmp_path, b"\xef\xbb\xbfforeground = yes\n" + CLIENT.encode())
    assert s.globals.foreground == "yes"
    s = load(tmp_path, b"\xef\xbb\xbf" + CLIENT.encode())
    assert service(s).client is True


def test_utf8_values_survive(tmp_path: Path) -> None:
    svc = service(load(tmp_path, CLIENT + "cert = /srv/c\u00e9rt.pem\n"))
    assert svc.cert == "/srv/c\u00e9rt.pem"


def test_option_names_are_case_insensitive(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "FOREGROUND = yes\nSysLog = no\n[s]\nCLIENT = yes\nACCEPT = 127.0.0.1:0\nConnect = 127.0.0.1:9\n"
        "cafile = /x/ca.pem\nVERIFYCHAIN = yes\ntimeoutidle = 5\nTIMEOUTCLOSE = 1\nchecKHost = a.example\n",
    )
    assert (s.globals.foreground, s.globals.syslog) == ("yes", False)
    svc = service(s)
    assert svc.client is True
    assert svc.accept == [Endpoint("127.0.0.1", 0)]
    assert svc.connect == [Endpoint("127.0.0.1", 9)]
    assert svc.CAfile == "/x/ca.pem" and svc.verifyChain is True
    assert (svc.TIMEOUTidle, svc.TIMEOUTclose) == (5, 1)
    assert svc.checkHost == ["a.example"]


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("curve = prime256v1", "curves", "prime256v1"),
        ("CURVE = secp384r1", "curves", "secp384r1"),
        ("curves = prime256v1", "curves", "prime256v1"),
        ("session = 300", "sessionCacheTimeout", 300),
        ("Session = 300", "sessionCacheTimeout", 300),
        ("sessionCacheTimeout = 300", "sessionCacheTimeout", 300),
    ],
)
def test_aliases_curve_and_session(tmp_path: Path, line: str, field: str, value: object) -> None:
    assert getattr(service(load(tmp_path, CLIENT + line + "\n")), field) == value
    # in the global section they are defaults for the services
    assert getattr(service(load(tmp_path, line + "\n" + CLIENT)), field) == value


def test_alias_and_canonical_name_are_one_option(tmp_path: Path) -> None:
    # a single curve overrides the earlier one, whichever spelling set it
    svc = service(load(tmp_path, CLIENT + "curves = prime256v1\ncurve = secp384r1\n"))
    assert svc.curves == "secp384r1"


def test_an_alias_error_quotes_the_alias_line(tmp_path: Path) -> None:
    p = only(fail(tmp_path, CLIENT + "session = soon\n"))
    assert (p.line, p.text) == (5, "session = soon")


def test_repeatable_options_keep_their_order(tmp_path: Path) -> None:
    svc = service(
        load(
            tmp_path,
            "[s]\nclient = yes\n"
            "accept = 127.0.0.1:0\naccept = ::1:0\naccept = /run/t.sock\n"
            "connect = b.example:2\nconnect = a.example:1\nconnect = [::1]:3\n"
            "CAfile = /x/ca.pem\nverifyChain = yes\n"
            "checkHost = z.example\ncheckHost = a.example\ncheckHost = m.example\n"
            "socket = r:TCP_KEEPIDLE=30\nsocket = l:SO_KEEPALIVE=yes\nsocket = a:SO_REUSEADDR=no\n"
            "options = NO_TICKET\noptions = -NO_TICKET\noptions = NO_COMPRESSION\n",
        )
    )
    assert svc.accept == [Endpoint("127.0.0.1", 0), Endpoint("::1", 0), Endpoint(None, 0, "/run/t.sock")]
    assert [(e.host, e.port) for e in svc.connect] == [("b.example", 2), ("a.example", 1), ("::1", 3)]
    assert svc.checkHost == ["z.example", "a.example", "m.example"]
    assert [(o.where, o.name, o.value) for o in svc.socket] == [
        ("r", "TCP_KEEPIDLE", 30),
        ("l", "SO_KEEPALIVE", 1),
        ("a", "SO_REUSEADDR", 0),
    ]
    assert svc.options == ["NO_TICKET", "-NO_TICKET", "NO_COMPRESSION"]


def test_a_repeated_single_valued_option_keeps_the_last_value(tmp_path: Path) -> None:
    # stunnel 5.68 accepts this too (the later line wins)
    svc = service(load(tmp_path, CLIENT + "TIMEOUTidle = 5\nTIMEOUTidle = 7\nsni = a\nsni = b\n"))
    assert (svc.TIMEOUTidle, svc.sni) == (7, "b")


# ----------------------------------------------------------------- include


def test_include_reads_files_in_sorted_name_order(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    # written in an order different from the sorted one, on purpose
    write(inc / "b.conf", "[bravo]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:2\n")
    write(inc / "10-x.conf", "[ten]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:3\n")
    write(inc / "a.conf", "[alpha]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\n")
    write(inc / "B-upper.conf", "[upper]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:4\n")
    (inc / "subdir").mkdir()  # directories inside are not files: skipped
    write(inc / "subdir" / "z.conf", "[never]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:5\n")
    s = load(tmp_path, f"foreground = yes\ninclude = {inc}\n")
    # byte order of the names: 10-x.conf < B-upper.conf < a.conf < b.conf
    assert [svc.name for svc in s.services] == ["ten", "upper", "alpha", "bravo"]


def test_relative_include_is_resolved_against_the_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "stunnel"
    write(etc / "conf.d" / "svc.conf", CLIENT)
    write(etc / "stunnel.conf", "foreground = yes\ninclude = conf.d\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "conf.d").mkdir()  # a decoy next to the working directory: must not be used
    monkeypatch.chdir(elsewhere)
    s = conf.load(str(etc / "stunnel.conf"))
    assert [svc.name for svc in s.services] == ["s"]


def test_nested_relative_include_is_relative_to_the_included_file(tmp_path: Path) -> None:
    write(tmp_path / "one" / "a.conf", "include = two\n")
    write(tmp_path / "one" / "two" / "b.conf", CLIENT)
    s = load(tmp_path, "include = one\n")
    assert [svc.name for svc in s.services] == ["s"]


def test_include_in_the_global_section_provides_defaults(tmp_path: Path) -> None:
    write(tmp_path / "defaults.d" / "00.conf", "client = yes\nTIMEOUTidle = 11\nsyslog = no\n")
    s = load(tmp_path, "include = defaults.d\n[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n")
    assert s.globals.syslog is False
    svc = service(s)
    assert (svc.client, svc.TIMEOUTidle) == (True, 11)


def test_utf8_bom_in_an_included_file(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.conf", b"\xef\xbb\xbf" + CLIENT.encode())
    assert [svc.name for svc in load(tmp_path, "include = d\n").services] == ["s"]


def test_errors_in_an_included_file_name_that_file_and_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "conf.d" / "a.conf", "[a]\nclient = yes\naccept = 127.0.0.1:0\nconect = 127.0.0.1:9\n"
    )
    problems = fail(tmp_path, "include = conf.d\n")
    p = next(p for p in problems if p.text == "conect = 127.0.0.1:9")
    assert (p.file, p.line) == (str(bad), 4)
    assert p.render().startswith(f'{bad}:4: "conect = 127.0.0.1:9": ')


def test_include_of_a_missing_directory_is_an_error_on_the_include_line(tmp_path: Path) -> None:
    problems = fail(tmp_path, "foreground = yes\ninclude = no-such.d\n" + CLIENT)
    p = only(problems)
    assert (p.file, p.line, p.text) == (str(tmp_path / "stunnel.conf"), 2, "include = no-such.d")
    assert "include" in p.render()


def test_include_loop_ends_with_an_error(tmp_path: Path) -> None:
    write(tmp_path / "loop.d" / "self.conf", "include = .\n")
    problems = fail(tmp_path, "include = loop.d\n" + CLIENT)
    assert any(p.text == "include = ." and p.line == 1 for p in problems), [p.render() for p in problems]


# ----------------------------------------------------------------- defaults from the global section


def test_service_options_in_the_global_section_are_defaults_for_every_service(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "client = yes\nTIMEOUTidle = 7\nsni = global.example\ndebug = 6\n"
        "socket = l:SO_KEEPALIVE=yes\nconnect = 127.0.0.1:1\n"
        "[a]\naccept = 127.0.0.1:0\n"
        "[b]\naccept = 127.0.0.1:0\nTIMEOUTidle = 9\nsni = b.example\nsocket = r:TCP_NODELAY=no\n"
        "connect = 127.0.0.1:2\n",
    )
    a, b = service(s, "a"), service(s, "b")
    assert s.defaults.client is True and s.defaults.TIMEOUTidle == 7
    assert a.client is True and b.client is True
    assert (a.TIMEOUTidle, a.sni, a.debug) == (7, "global.example", ("daemon", 6))
    # a section's own single-valued line replaces the default ...
    assert (b.TIMEOUTidle, b.sni, b.debug) == (9, "b.example", ("daemon", 6))
    # ... and a repeatable one extends it, defaults first
    assert [(o.where, o.name) for o in a.socket] == [("l", "SO_KEEPALIVE")]
    assert [(o.where, o.name) for o in b.socket] == [("l", "SO_KEEPALIVE"), ("r", "TCP_NODELAY")]
    assert a.connect == [Endpoint("127.0.0.1", 1)]
    assert b.connect == [Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)]


def test_global_defaults_do_not_change_the_global_options(tmp_path: Path) -> None:
    s = load(tmp_path, "TIMEOUTclose = 3\n" + CLIENT)
    assert not hasattr(s.globals, "TIMEOUTclose")
    assert s.defaults.TIMEOUTclose == 3 and service(s).TIMEOUTclose == 3


# ----------------------------------------------------------------- inetd mode


def test_a_file_without_sections_is_inetd_mode(tmp_path: Path) -> None:
    s = load(tmp_path, "client = yes\nconnect = 127.0.0.1:465\nservice = smtps-in\n")
    assert s.inetd is True
    (svc,) = s.services
    assert svc.name == "smtps-in"
    assert svc.client is True and svc.connect == [Endpoint("127.0.0.1", 465)]


def test_inetd_service_is_named_stunnel_by_default(tmp_path: Path) -> None:
    s = load(tmp_path, "client = yes\nconnect = 127.0.0.1:465\n")
    assert s.inetd is True and [svc.name for svc in s.services] == ["stunnel"]


def test_one_section_is_not_inetd_mode(tmp_path: Path) -> None:
    assert load(tmp_path, CLIENT).inetd is False


def test_inetd_mode_needs_connect(tmp_path: Path) -> None:
    problems = fail(tmp_path, "client = yes\n")
    assert any("Each service must define two endpoints" in p.message for p in problems)


# ----------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2525", Endpoint(None, 2525)),
        ("0", Endpoint(None, 0)),
        ("127.0.0.1:0", Endpoint("127.0.0.1", 0)),
        ("localhost:465", Endpoint("localhost", 465)),
        ("smtp.gmail.com:465", Endpoint("smtp.gmail.com", 465)),
        ("::1:0", Endpoint("::1", 0)),  # split at the last colon
        (":::443", Endpoint("::", 443)),
        ("fe80::1:2:3:8443", Endpoint("fe80::1:2:3", 8443)),
        ("[::1]:443", Endpoint("::1", 443)),
        ("[::]:0", Endpoint("::", 0)),
        ("/run/pytunnel/app.sock", Endpoint(None, 0, "/run/pytunnel/app.sock")),
    ],
)
def test_addresses(tmp_path: Path, value: str, expected: Endpoint) -> None:
    svc = service(load(tmp_path, f"[s]\nclient = yes\naccept = {value}\nconnect = {value}\n"))
    assert svc.accept == [expected]
    assert svc.connect == [expected]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:http-nonsense-port",
        "mail.example.com",
        "[::1]443",
        "[x]:1",
    ],
)
def test_bad_addresses_are_reported_on_their_line(tmp_path: Path, value: str) -> None:
    problems = fail(tmp_path, f"[s]\nclient = yes\naccept = 127.0.0.1:0\nconnect = {value}\n")
    p = next(p for p in problems if p.line == 4)
    assert p.text is not None and p.text.strip() == f"connect = {value}".strip()
    assert p.message


# ----------------------------------------------------------------- error reports


def test_every_error_carries_file_line_and_the_quoted_line(tmp_path: Path) -> None:
    path = tmp_path / "stunnel.conf"
    p = only(fail(tmp_path, CLIENT + "TIMEOUTidle = soon\n"))
    assert (p.file, p.line, p.text) == (str(path), 5, "TIMEOUTidle = soon")
    assert p.message
    assert p.render().startswith(f'{path}:5: "TIMEOUTidle = soon": ')
    assert p.message in p.render()


def test_the_quoted_line_is_the_line_as_written(tmp_path: Path) -> None:
    # stunnel 5.68: /etc/x.conf:5: "    client = maybe   ": The argument needs ...
    # (the reference quotes `"    retry = 10"`): indentation and trailing blanks are kept,
    # only the line terminator is dropped.
    path = tmp_path / "stunnel.conf"
    p = only(
        fail(tmp_path, b"[s]\r\naccept = 127.0.0.1:0\r\nconnect = 127.0.0.1:9\r\n    client = maybe   \r\n")
    )
    assert (p.line, p.text) == (4, "    client = maybe   ")
    assert p.render() == (
        f"{path}:4: \"    client = maybe   \": The argument needs to be either 'yes' or 'no'"
    )


def test_config_error_text_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "[s]\nclient = maybe\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nreset = perhaps\n")
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines == [p.render() for p in err.value.problems]


@pytest.mark.parametrize("spelling", ["conect", "CONECT", "connnect"])
def test_did_you_mean_for_a_misspelt_option(tmp_path: Path, spelling: str) -> None:
    problems = fail(tmp_path, f"[s]\nclient = yes\naccept = 127.0.0.1:0\n{spelling} = 127.0.0.1:9\n")
    p = next(p for p in problems if p.line == 4)
    assert p.text == f"{spelling} = 127.0.0.1:9"
    assert p.message == "Specified option name is not valid here"  # stunnel's words
    assert p.hint is not None and '"connect"' in p.hint
    assert 'did you mean "connect"?' in p.render()


def test_did_you_mean_in_the_global_section(tmp_path: Path) -> None:
    p = only(fail(tmp_path, "forground = yes\n" + CLIENT))
    assert p.line == 1 and '"foreground"' in (p.hint or "")


def test_no_suggestion_for_nonsense(tmp_path: Path) -> None:
    p = only(fail(tmp_path, CLIENT + "qwertyuiop = 1\n"))
    assert p.line == 5 and "did you mean" not in p.render()


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ("[s]\nclient = yes\naccept = 127.0.0.1:0\n", "connect"),
        ("[s]\nclient = yes\nconnect = 127.0.0.1:9\n", "accept"),
        ("[s]\nclient = yes\n", "accept"),
    ],
)
def test_missing_endpoint(tmp_path: Path, body: str, missing: str) -> None:
    p = only(fail(tmp_path, body))
    assert "Each service must define two endpoints" in p.message
    assert "[s]" in p.message  # stunnel: "Service [s]: Each service must define two endpoints"
    assert (p.line, p.text) == (1, "[s]")
    assert missing in (p.hint or "")


@pytest.mark.parametrize("option", ["client", "reset", "delay", "sessionResume", "requireCert"])
def test_yes_no_options_accept_only_yes_or_no(tmp_path: Path, option: str) -> None:
    p = only(fail(tmp_path, CLIENT + f"{option} = maybe\n"))
    assert p.message == "The argument needs to be either 'yes' or 'no'"  # stunnel's text
    assert (p.line, p.text) == (5, f"{option} = maybe")
    # yes/no themselves are case-insensitive, as in stunnel (strcasecmp)
    svc = service(load(tmp_path, CLIENT + f"{option} = YES\n"))
    assert getattr(svc, option) is True


def test_client_maybe(tmp_path: Path) -> None:
    p = only(fail(tmp_path, "[s]\nclient = maybe\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"))
    assert (p.line, p.text, p.message) == (
        2,
        "client = maybe",
        "The argument needs to be either 'yes' or 'no'",
    )


def test_server_mode_needs_a_certificate(tmp_path: Path) -> None:
    p = only(fail(tmp_path, "[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"))
    assert "TLS server needs a certificate" in p.message and "[srv]" in p.message
    assert (p.line, p.text) == (1, "[srv]")
    # explicit client = no is server mode too; a cert (or client = yes) fixes it
    assert "TLS server needs a certificate" in only(fail(tmp_path, CLIENT + "client = no\n")).message
    load(tmp_path, CLIENT + "client = no\ncert = /srv/server.pem\n")


@pytest.mark.parametrize("option", ["verifyChain", "verifyPeer"])
def test_verification_needs_cafile_or_capath(tmp_path: Path, option: str) -> None:
    p = only(fail(tmp_path, CLIENT + f"{option} = yes\n"))
    assert 'Either "CAengine", "CAfile" or "CApath" has to be configured' in p.message
    assert (p.line, p.text) == (5, f"{option} = yes")  # the line that asked for verification
    load(tmp_path, CLIENT + f"{option} = yes\nCAfile = /x/ca.pem\n")
    load(tmp_path, CLIENT + f"{option} = yes\nCApath = /etc/ssl/certs\n")
    load(tmp_path, f"CAfile = /x/ca.pem\n{CLIENT}{option} = yes\n")  # CAfile as a global default


@pytest.mark.parametrize("level", ["1", "2", "3", "4"])
def test_legacy_verify_levels_need_cafile_too(tmp_path: Path, level: str) -> None:
    # stunnel 5.68: verify = 1..4 without CAfile/CApath ->
    # Service [a]: Either "CAengine", "CAfile" or "CApath" has to be configured
    p = only(fail(tmp_path, CLIENT + f"verify = {level}\n"))
    assert 'Either "CAengine", "CAfile" or "CApath" has to be configured' in p.message
    assert (p.line, p.text) == (5, f"verify = {level}")
    assert service(load(tmp_path, CLIENT + f"verify = {level}\nCAfile = /x/ca.pem\n")).verify == int(level)


def test_legacy_verify_zero_needs_no_cafile(tmp_path: Path) -> None:
    assert service(load(tmp_path, CLIENT + "verify = 0\n")).verify == 0


@pytest.mark.parametrize(("level", "ok"), [("0", False), ("1", True), ("2", True), ("3", True), ("4", True)])
def test_check_host_with_legacy_verify(tmp_path: Path, level: str, ok: bool) -> None:
    # stunnel 5.68 accepts checkHost with any verify level that verifies (1-4), not with 0
    body = CLIENT + f"CAfile = /x/ca.pem\nverify = {level}\ncheckHost = a.example\n"
    if ok:
        assert service(load(tmp_path, body)).checkHost == ["a.example"]
    else:
        p = only(fail(tmp_path, body))
        assert 'Either "verifyChain" or "verifyPeer" has to be enabled' in p.message


def test_check_host_needs_verification(tmp_path: Path) -> None:
    # at verifyChain's default the mode decides: stunnel's (and `pytunnel CONFIG`) refuse,
    # `pytunnel run` verifies by default, so the names are checked
    svc = service(load(tmp_path, CLIENT + "checkHost = a.example\n"))
    assert rules.names_need_verify(svc, secure=True) is None
    p = rules.names_need_verify(svc, secure=False)
    assert p is not None
    assert 'Either "verifyChain" or "verifyPeer" has to be enabled' in p.message
    assert (p.line, p.text) == (5, "checkHost = a.example")
    p = only(fail(tmp_path, CLIENT + "verifyChain = no\ncheckHost = a.example\n"))
    assert 'Either "verifyChain" or "verifyPeer" has to be enabled' in p.message


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("redirect = 127.0.0.1:10", '"redirect" is unsupported in client sections'),
        ("ticketKeySecret = 00112233445566778899aabbccddeeff", '"ticketMacSecret" must be set together'),
        ("sslVersion = SSLv3", "SSLv3"),
    ],
)
def test_service_rules_point_at_the_offending_line(tmp_path: Path, line: str, needle: str) -> None:
    p = only(fail(tmp_path, CLIENT + line + "\n"))
    assert needle in p.message
    assert (p.line, p.text) == (5, line)


def test_service_rules_in_inetd_mode_still_carry_a_line(tmp_path: Path) -> None:
    # no [section] header to point at: the option's own line must be named
    p = only(fail(tmp_path, "client = yes\nconnect = 127.0.0.1:9\nredirect = 127.0.0.1:10\n"))
    assert (p.line, p.text) == (3, "redirect = 127.0.0.1:10")


def test_version_range_error_points_at_a_version_line(tmp_path: Path) -> None:
    p = only(fail(tmp_path, CLIENT + "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.2\n"))
    assert "Invalid protocol version range" in p.message
    assert p.line in (5, 6) and p.text is not None and "sslVersionM" in p.text


@pytest.mark.parametrize(
    "line", ["pid = /tmp/x.pid", "PID = /tmp/x.pid", "foreground = yes", "output = /tmp/x", "syslog = no",
             "chroot = /var/empty", "RNDbytes = 64", "service = x", "log = overwrite"],
)  # fmt: skip
def test_global_only_option_inside_a_section_is_rejected(tmp_path: Path, line: str) -> None:
    name = line.split()[0]
    p = only(fail(tmp_path, CLIENT + line + "\n"))
    assert (p.line, p.text) == (5, line)
    assert "global" in p.message and name.lower() in p.message.lower()
    # the same line above the first section is fine
    load(tmp_path, line + "\n" + CLIENT)


@pytest.mark.parametrize(
    ("line", "global_", "reason"),
    [
        ("engine = auto", True, "engine"),
        ("engineCtrl = FOO:1", True, "engine"),
        ("fips = yes", True, "FIPS"),
        ("taskbar = yes", True, "Windows"),
        ("iconIdle = idle.ico", True, "Windows"),
        ("compression = zlib", True, "compression"),
        ("provider = legacy", True, "provider"),
        ("libwrap = yes", False, "firewall"),
        ("engineId = pkcs11", False, "engine"),
        ("CAengine = pkcs11", False, "engine"),
        # before 3.13 the ssl module has no PSK callbacks; on 3.13 PSKsecrets works (test_psk.py)
        *(
            [("PSKsecrets = /x/psk.txt", False, "needs Python 3.13 or newer")]
            if sys.version_info < (3, 13)
            else []
        ),
    ],
)
def test_unsupported_options_are_rejected_with_their_reason(
    tmp_path: Path, line: str, global_: bool, reason: str
) -> None:
    body = (line + "\n" + CLIENT) if global_ else (CLIENT + line + "\n")
    p = only(fail(tmp_path, body))
    assert p.text == line and p.line == (1 if global_ else 5)
    assert reason.lower() in p.message.lower()
    assert len(p.message) > len(reason)  # a reason, not just the name


def test_fips_yes_uses_stunnels_text(tmp_path: Path) -> None:
    p = only(fail(tmp_path, "fips = yes\n" + CLIENT))
    assert p.message == "FIPS support is not available"  # what tools grep


@pytest.mark.parametrize(
    ("line", "global_"),
    [
        ("fips = no", True),
        ("FIPS = NO", True),
        ("OCSPaia = no", False),
        ("OCSPnonce = no", False),
        ("libwrap = no", False),
        ("pty = no", False),
        ("transparent = none", False),
        ("transparent = no", False),
    ],
)
def test_off_values_of_unsupported_options_are_accepted(tmp_path: Path, line: str, global_: bool) -> None:
    body = (line + "\n" + CLIENT) if global_ else (CLIENT + line + "\n")
    s = load(tmp_path, body)
    assert [svc.name for svc in s.services] == ["s"]


def test_off_value_of_an_unsupported_service_option_as_a_global_default(tmp_path: Path) -> None:
    s = load(tmp_path, "libwrap = no\nOCSPaia = no\n" + CLIENT)
    assert [svc.name for svc in s.services] == ["s"]


def test_duplicate_section_names_are_rejected(tmp_path: Path) -> None:
    # pytunnel's own rule (stunnel 5.68 silently runs both): two services with one name
    # cannot be told apart in logs
    body = CLIENT + "[s]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:8\n"
    p = only(fail(tmp_path, body))
    assert (p.line, p.text) == (5, "[s]")
    assert "duplicate" in p.message.lower()


@pytest.mark.parametrize(("line", "what"), [("[s", "section"), ("just words", "option")])
def test_malformed_lines(tmp_path: Path, line: str, what: str) -> None:
    problems = fail(tmp_path, CLIENT + line + "\n")
    p = next(p for p in problems if p.line == 5)
    assert p.text == line and what in p.render()


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        conf.load(str(tmp_path / "absent.conf"))
    p = only(err.value.problems)
    assert p.file == str(tmp_path / "absent.conf") and p.line is None
    assert "Cannot open configuration file" in p.message


def test_invalid_utf8_is_reported_on_its_line(tmp_path: Path) -> None:
    problems = fail(tmp_path, CLIENT.encode() + b"sni = caf\xe9\n")
    p = next(p for p in problems if p.line == 5)
    assert "UTF-8" in p.message


def test_all_errors_are_collected_and_sorted_by_line(tmp_path: Path) -> None:
    path = tmp_path / "stunnel.conf"
    body = (
        "forground = yes\n"  # 1 unknown option
        "debug = loud\n"  # 2 bad level
        "[a]\n"
        "client = maybe\n"  # 4 yes/no
        "accept = 127.0.0.1:0\n"
        "connect = 127.0.0.1:9\n"
        "pid = /x\n"  # 7 global-only
        "[b]\n"
        "client = yes\n"
        "accept = 127.0.0.1:99999\n"  # 10 port range
        "connect = 127.0.0.1:9\n"
        "TIMEOUTbusy = q\n"  # 12 number
        "engine = auto\n"  # 13 global-only (and unsupported)
    )
    problems = fail(tmp_path, body)
    assert all(p.file == str(path) for p in problems)
    assert all(p.line is not None for p in problems), [p.render() for p in problems]
    lines = [p.line or 0 for p in problems]
    assert lines == sorted(lines)
    assert {1, 2, 4, 7, 10, 12, 13} <= set(lines), [p.render() for p in problems]
    texts = {p.line: p.text for p in problems}
    assert texts[4] == "client = maybe" and texts[12] == "TIMEOUTbusy = q"


def test_errors_in_several_services_are_all_reported(tmp_path: Path) -> None:
    body = "".join(
        f"[s{i}]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nTIMEOUTidle = x{i}\n"
        for i in range(4)
    )
    problems = fail(tmp_path, body)
    assert [(p.line, p.text) for p in problems] == [(5 + 5 * i, f"TIMEOUTidle = x{i}") for i in range(4)]


def test_same_bad_global_default_is_reported_once(tmp_path: Path) -> None:
    # a broken default reaches every service; the report names its line once
    body = "TIMEOUTidle = soon\n" + CLIENT + CLIENT.replace("[s]", "[t]")
    p = only(fail(tmp_path, body))
    assert (p.line, p.text) == (1, "TIMEOUTidle = soon")


def test_sni_naming_an_unknown_service_points_at_the_sni_line(tmp_path: Path) -> None:
    body = "[virt]\ncert = /srv/server.pem\nconnect = 127.0.0.1:9\nsni = nosuch:*.example.com\n"
    p = only(fail(tmp_path, body))
    assert "SNI section name not found" in p.message  # stunnel's words
    assert (p.line, p.text) == (4, "sni = nosuch:*.example.com")


def test_load_is_independent_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "a" / "stunnel.conf", CLIENT)
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(path)
    s = conf.load(rel)
    assert s.source == rel and [svc.name for svc in s.services] == ["s"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("debug = \u00b3", "expected 0-7"),
        ("retry = \u00b2", "expected yes, no or a delay"),
        ("TIMEOUTidle = \u00b2", "not a non-negative whole number"),
        ("connect = 127.0.0.1:\u00b9", "port"),
    ],
)
def test_non_ascii_digits_get_the_options_own_message(tmp_path: Path, line: str, needle: str) -> None:
    # str.isdigit() is true for superscripts, but int() refuses them: the message must still
    # say what the option takes, not "invalid literal for int()"
    p = only(fail(tmp_path, CLIENT + line + "\n"))
    assert (p.line, p.text) == (5, line)
    assert needle in p.message and "invalid literal" not in p.message


def test_an_unreadable_file_is_one_problem_not_a_phantom_service(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        conf.load(str(tmp_path / "absent.conf"))
    p = only(err.value.problems)
    assert p.message == "Cannot open configuration file: No such file or directory"  # stunnel's words first


def test_include_without_a_directory(tmp_path: Path) -> None:
    p = only(fail(tmp_path, "include =\n" + CLIENT))
    assert "include needs a directory" in p.message and p.line == 1


def test_include_of_its_own_directory_is_a_loop_not_a_hang(tmp_path: Path) -> None:
    """The including file is in the directory it includes: one clear problem, at once."""
    d = tmp_path / "conf.d"
    d.mkdir()
    (d / "00-main.conf").write_text(f"include = {d}\n" + CLIENT)
    (d / "10-other.conf").write_text("; nothing\n")
    with pytest.raises(ConfigError) as err:
        conf.load(str(d / "00-main.conf"))
    assert any("which is being read (a loop)" in p.message for p in err.value.problems)


def test_a_nul_character_is_a_problem_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "nul.conf"
    path.write_bytes(CLIENT.encode() + b"ciphers = HIGH\x00junk\n")
    with pytest.raises(ConfigError) as err:
        conf.load(str(path))
    p = only(err.value.problems)
    assert "NUL" in p.message and p.line == CLIENT.count("\n") + 1


def test_a_refused_section_header_does_not_cascade(tmp_path: Path) -> None:
    """The lines under a bad header belong to it: one problem, not a second one about
    options in the wrong (global) place."""
    p = only(fail(tmp_path, b"[caf\xe9]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"))
    assert p.line == 1 and "UTF-8" in p.message

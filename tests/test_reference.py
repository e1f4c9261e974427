"""Walk the stunnel reference (/work/shared/stunnel-reference.md): every option row of the
global and service tables is either a pydantic field with the documented default that works
when written in a config, or is rejected with a reason in a ConfigError naming the option.
No option is silently dropped: a supported option's value always shows up in the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tunnel import conf
from tunnel.addr import Endpoint
from tunnel.errors import ConfigError, Problem
from tunnel.settings import (
    ALIASES,
    CANONICAL,
    GLOBAL_FIELDS,
    SERVICE_FIELDS,
    Settings,
    field_meta,
)
from tunnel.sockopts import SocketOption

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "stunnel-reference.md"


class Row(NamedTuple):
    table: str  # "global" or "service"
    names: tuple[str, ...]  # the backquoted names of the first column (aliases included)
    value: str
    default: str
    notes: str


# The rows of the reference's two option tables, embedded so the walk also runs where
# shared/ is absent; test_embedded_rows_match_the_reference keeps them in step with the file.
EMBEDDED: list[Row] = [
    Row("global", ("chroot",), "DIR", "none", "U, B:HAVE_CHROOT"),
    Row(
        "global",
        ("compression",),
        "`deflate`\\|`zlib`",
        "no compression",
        "B:OpenSSL with compression (OPENSSL_NO_COMP unset)",
    ),
    Row("global", ("debug",), "[FACILITY.]LEVEL", "`daemon.notice` (5)", "; also service-level"),
    Row("global", ("EGD",), "PATH", "none", "U, B:EGD_SOCKET"),
    Row("global", ("engine",), "`auto`\\|ENGINE_ID", "software only", "B:ENGINE"),
    Row("global", ("engineCtrl",), "CMD[:PARAM]", "", "B:ENGINE"),
    Row("global", ("engineDefault",), "TASK_LIST", "", "B:ENGINE"),
    Row("global", ("fips",), "yes\\|no", "no", "B:FIPS (USE_FIPS + FIPS provider)"),
    Row("global", ("foreground",), "yes\\|quiet\\|no", "background", "U"),
    Row("global", ("iconActive", "iconError", "iconIdle"), "ICON_FILE", "built-in", "GUI"),
    Row("global", ("log",), "append\\|overwrite", "append", ""),
    Row("global", ("output",), "FILE", "none", ""),
    Row("global", ("pid",), "FILE", "build default", "U"),
    Row("global", ("provider",), "PROVIDER_ID", "", "≥3.0"),
    Row("global", ("providerParameter",), "ID:PARAM=VALUE", "", "≥3.5"),
    Row("global", ("RNDbytes",), "BYTES", "1024", ""),
    Row("global", ("RNDfile",), "FILE", "build default (Debian: /dev/urandom)", ""),
    Row("global", ("RNDoverwrite",), "yes\\|no", "yes", ""),
    Row("global", ("service",), "NAME", "`stunnel`", "U"),
    Row("global", ("setEnv",), "VAR=VALUE", "", "new in 5.75"),
    Row("global", ("syslog",), "yes\\|no", "yes", "U"),
    Row("global", ("taskbar",), "yes\\|no", "yes", "W"),
    Row("global", ("setuid", "setgid"), "USER / GROUP", "", "U"),
    Row("service", ("accept",), "[HOST:]PORT", "none", ""),
    Row("service", ("CAengine",), "ID", "", "B:ENGINE"),
    Row("service", ("CApath",), "DIR", "none", ""),
    Row("service", ("CAfile",), "FILE", "none", ""),
    Row("service", ("CAstore",), "URI", "none", "≥3.0, new in 5.75"),
    Row("service", ("cert",), "FILE\\|URI", "none (required in server mode)", ""),
    Row("service", ("checkEmail",), "EMAIL", "no check", "≥1.0.2"),
    Row("service", ("checkHost",), "HOST", "no check", "≥1.0.2"),
    Row("service", ("checkIP",), "IP", "no check", "≥1.0.2"),
    Row(
        "service",
        ("ciphers",),
        "LIST",
        "src: `HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK` (FIPS: `FIPS:!DH:!kDHEPSK`)",
        "",
    ),
    Row(
        "service",
        ("ciphersuites",),
        "LIST",
        "src: `TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256` (pod lists CHACHA first)",
        "≥1.1.1",
    ),
    Row("service", ("client",), "yes\\|no", "no", ""),
    Row("service", ("config",), "CMD[:PARAM]", "", "≥1.0.2"),
    Row("service", ("connect",), "[HOST:]PORT", "none", ""),
    Row("service", ("CRLpath",), "DIR", "none", ""),
    Row("service", ("CRLfile",), "FILE", "none", ""),
    Row(
        "service",
        ("curves", "curve"),
        "LIST",
        "`X25519:P-256:X448:P-521:P-384` (FIPS: `P-256:P-521:P-384`)",
        "B:ECDH",
    ),
    Row("service", ("logId",), "sequential\\|unique\\|thread\\|process", "sequential", ""),
    Row("service", ("debug",), "LEVEL", "notice", ""),
    Row("service", ("delay",), "yes\\|no", "no", ""),
    Row("service", ("engineId", "engineNum"), "ID / N", "", "B:ENGINE"),
    Row("service", ("exec",), "PATH", "none", ""),
    Row("service", ("execArgs",), "$0 $1 …", "", ""),
    Row("service", ("failover",), "rr\\|prio", "prio", ""),
    Row("service", ("ident",), "USERNAME", "none", ""),
    Row("service", ("include",), "DIR", "", "; listed as service-level, used in global position"),
    Row("service", ("key",), "FILE\\|URI", "value of `cert`", ""),
    Row("service", ("libwrap",), "yes\\|no", "no", "B:LIBWRAP (Debian 5.68 has it)"),
    Row("service", ("local",), "HOST", "OS choice", ""),
    Row("service", ("OCSP",), "URL", "none", "B:OCSP"),
    Row("service", ("OCSPaia",), "yes\\|no", "no", "B:OCSP"),
    Row("service", ("OCSPflag",), "FLAG", "", "B:OCSP"),
    Row("service", ("OCSPnonce",), "yes\\|no", "no", "B:OCSP"),
    Row("service", ("OCSPrequire",), "yes\\|no", "yes", "B:OCSP"),
    Row("service", ("options",), "NAME or -NAME", "`NO_SSLv2`, `NO_SSLv3`", "; names: see below"),
    Row(
        "service",
        ("protocol",),
        "cifs\\|capwin\\|capwinctrl\\|connect\\|imap\\|ldap\\|nntp\\|pgsql\\|pop3\\|proxy\\|smtp\\|socks",
        "none",
        "",
    ),
    Row(
        "service",
        ("protocolAuthentication",),
        "basic\\|ntlm (connect), plain\\|login (smtp)",
        "basic / plain",
        "",
    ),
    Row("service", ("protocolDomain",), "DOMAIN", "", ""),
    Row("service", ("protocolHeader",), "HEADER", "", ""),
    Row("service", ("protocolHost",), "HOST:PORT / name", "", ""),
    Row("service", ("protocolPassword", "protocolUsername"), "string", "", ""),
    Row("service", ("PSKidentity",), "ID", "first in PSKsecrets", "B:PSK"),
    Row("service", ("PSKsecrets",), "FILE", "none", "B:PSK"),
    Row("service", ("pty",), "yes\\|no", "no", "U"),
    Row("service", ("redirect",), "[HOST:]PORT", "none", ""),
    Row("service", ("renegotiation",), "yes\\|no", "yes", ""),
    Row("service", ("requireCert",), "yes\\|no", "no", ""),
    Row("service", ("reset",), "yes\\|no", "yes", "peers see `Connection reset by peer`"),
    Row("service", ("retry",), "yes\\|no\\|DELAY_MS", "no", "DELAY new in 5.70"),
    Row("service", ("securityLevel",), "0-5", "2", "≥1.1.0"),
    Row("service", ("sessionCacheSize",), "N", "1000 (src)", ""),
    Row("service", ("sessionCacheTimeout", "session"), "SECONDS", "300 (src)", ""),
    Row("service", ("sessionResume",), "yes\\|no", "yes", ""),
    Row("service", ("sessiond",), "HOST:PORT", "none", ""),
    Row("service", ("sni",), "SERVICE:PATTERN", "", "B:TLSEXT"),
    Row(
        "service",
        ("sni",),
        "NAME",
        "src: `protocolHost`, else host part of the first `connect` (even an IP), else `localhost`",
        "B:TLSEXT",
    ),
    Row("service", ("socket",), "a\\|l\\|r:OPTION=VALUE[:VALUE]", "see below", ""),
    Row("service", ("sslVersion",), "all\\|SSLv2\\|SSLv3\\|TLSv1\\|TLSv1.1\\|TLSv1.2\\|TLSv1.3", "", ""),
    Row("service", ("sslVersionMax",), "all\\|SSLv3\\|TLSv1…TLSv1.3", "all", "≥1.1.0"),
    Row(
        "service",
        ("sslVersionMin",),
        "all\\|SSLv3\\|TLSv1…TLSv1.3",
        "pod: TLSv1; src: 0 = lowest supported",
        "≥1.1.0",
    ),
    Row("service", ("stack",), "BYTES", "65536 (131072 on some builds)", "not in FORK model"),
    Row(
        "service",
        ("ticketKeySecret", "ticketMacSecret"),
        "16 or 32 bytes hex, `:` allowed",
        "random",
        "≥1.0.0",
    ),
    Row("service", ("TIMEOUTbusy",), "S", "300", ""),
    Row("service", ("TIMEOUTclose",), "S", "60", ""),
    Row("service", ("TIMEOUTconnect",), "S", "10", ""),
    Row("service", ("TIMEOUTidle",), "S", "43200", ""),
    Row("service", ("TIMEOUTocsp",), "S", "5 (src)", "B:OCSP"),
    Row(
        "service",
        ("transparent",),
        "none\\|source\\|destination\\|both (yes/no legacy)",
        "none",
        "U (Linux/FreeBSD, root, iptables)",
    ),
    Row("service", ("verify",), "0-4", "none", ""),
    Row("service", ("verifyChain",), "yes\\|no", "no", ""),
    Row("service", ("verifyPeer",), "yes\\|no", "no", ""),
]


def parse_reference(text: str) -> list[Row]:
    rows: list[Row] = []
    for heading, table in (("## Global options", "global"), ("## Service-level options", "service")):
        assert heading in text, f"the reference lost its {heading!r} table"
        body = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for line in body.splitlines():
            if not line.startswith("| `"):
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 5, line
            names = tuple(re.findall(r"`([A-Za-z]+)`", cells[0]))
            rows.append(Row(table, names, cells[1], cells[3], cells[4]))
    return rows


ROWS = parse_reference(REFERENCE.read_text(encoding="utf-8")) if REFERENCE.exists() else EMBEDDED
#: (table, name) for every option name of the reference, aliases included, once each
NAMES: list[tuple[str, str]] = sorted({(r.table, n) for r in ROWS for n in r.names})
IDS = [f"{t}-{n}" for t, n in NAMES]


def canon(name: str) -> str:
    return CANONICAL[name.lower()]


def unsupported(name: str) -> str | None:
    why = field_meta(canon(name)).get("unsupported")
    return str(why) if why else None


def model_default(name: str) -> Any:
    info = SERVICE_FIELDS.get(canon(name)) or GLOBAL_FIELDS[canon(name)]
    return info.get_default(call_default_factory=True)


BASE = {"client": "yes", "accept": "127.0.0.1:0", "connect": "127.0.0.1:9"}
#: what an option needs beside it to be valid (stunnel's own cross-field rules)
PREREQ: dict[str, dict[str, str | None]] = {  # None: drop that option of BASE
    "verifyChain": {"CAfile": "/x/ca.pem"},
    "verifyPeer": {"CAfile": "/x/ca.pem"},
    "verify": {"CAfile": "/x/ca.pem"},
    "checkHost": {"CAfile": "/x/ca.pem", "verifyChain": "yes"},
    "checkIP": {"CAfile": "/x/ca.pem", "verifyChain": "yes"},
    "checkEmail": {"CAfile": "/x/ca.pem", "verifyChain": "yes"},
    "exec": {"connect": None},
    "pty": {"connect": None, "exec": "/bin/cat", "client": "no", "cert": "/x/cert.pem"},
    "execArgs": {"connect": None, "exec": "/bin/cat"},
    "protocolAuthentication": {"protocol": "smtp"},
    "protocolHeader": {"protocol": "connect", "protocolHost": "www.example:443"},
    "protocolHost": {"protocol": "smtp"},
    "protocolUsername": {"protocol": "smtp"},
    "protocolPassword": {"protocol": "smtp"},
    "redirect": {"client": "no", "cert": "/x/cert.pem", "verifyChain": "yes", "CAfile": "/x/ca.pem"},
    "ticketKeySecret": {"client": "no", "cert": "/x/cert.pem", "ticketMacSecret": "ee" * 16},
    "ticketMacSecret": {"client": "no", "cert": "/x/cert.pem", "ticketKeySecret": "ee" * 16},
}


def write_config(tmp_path: Path, glob: list[str], section: dict[str, str], extra: Sequence[str] = ()) -> Path:
    lines = [*glob, "[s]", *(f"{k} = {v}" for k, v in section.items()), *extra]
    path = tmp_path / "stunnel.conf"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def section_for(name: str) -> dict[str, str]:
    """A valid client section without ``name`` (the sample line supplies it)."""
    c = canon(name)
    return {k: v for k, v in {**BASE, **PREREQ.get(c, {})}.items() if k != c and v is not None}


def rejected(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as err:
        conf.load(str(path))
    assert err.value.problems
    return err.value.problems


# ------------------------------------------------------------------ the table itself


def test_embedded_rows_match_the_reference() -> None:
    if REFERENCE.exists():
        parsed = parse_reference(REFERENCE.read_text(encoding="utf-8"))
        assert parsed == EMBEDDED, "stunnel-reference.md changed: update EMBEDDED (and the models)"
    # either way the walk covers stunnel's whole option set
    assert len({n for r in ROWS for n in r.names}) >= 100
    assert {"accept", "connect", "client", "TIMEOUTidle", "taskbar", "curve", "session"} <= {
        n for r in ROWS for n in r.names
    }


@pytest.mark.parametrize(("table", "name"), NAMES, ids=IDS)
def test_every_reference_option_is_a_model_field(table: str, name: str) -> None:
    assert name.lower() in CANONICAL, f"{name}: not in tunnel/settings.py"
    c = canon(name)
    if c != name:
        assert ALIASES.get(name) == c, f"{name} is spelt differently in the model: {c}"
    if table == "service":
        # service-level: usable inside a [section] (and as a global default)
        assert c in SERVICE_FIELDS, f"{name} is a service option but the model makes it global-only"
    else:
        assert c in GLOBAL_FIELDS or c in SERVICE_FIELDS
    if c in GLOBAL_FIELDS:
        assert field_meta(c)["scope"] == "global"


#: options pytunnel adds (each says "pytunnel only" in its help, so a user sees stunnel lacks it)
PYTUNNEL_ONLY = {"workers"}


def test_no_model_option_is_missing_from_the_reference() -> None:
    documented = {n for r in ROWS for n in r.names}
    global_table = {n for r in ROWS if r.table == "global" for n in r.names}
    extensions = {n for n in SERVICE_FIELDS if field_meta(n).get("extension")}
    assert extensions <= {n for n in SERVICE_FIELDS if n not in documented}, "an extension stunnel has"
    assert set(SERVICE_FIELDS) - documented - extensions == set(), "model options stunnel does not have"
    gext = {n for n in GLOBAL_FIELDS if field_meta(n).get("extension")}
    assert set(GLOBAL_FIELDS) - documented - gext == PYTUNNEL_ONLY, "model options stunnel does not have"
    for name in PYTUNNEL_ONLY:
        assert "pytunnel only" in str(GLOBAL_FIELDS[name].description)
    # an option the model makes global-only must come from stunnel's global table
    assert set(GLOBAL_FIELDS) - PYTUNNEL_ONLY - gext <= global_table


# ------------------------------------------------------------------ defaults


class Unset(NamedTuple):
    """The model leaves it unset (None); unset means the documented value."""

    means: object


#: option -> (the default cell as the reference writes it, the model's default)
DEFAULTS: dict[str, tuple[str, object]] = {
    "TIMEOUTbusy": ("300", 300),
    "TIMEOUTclose": ("60", 60),
    "TIMEOUTconnect": ("10", 10),
    "TIMEOUTidle": ("43200", 43200),
    "ciphers": (
        "src: `HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK` (FIPS: `FIPS:!DH:!kDHEPSK`)",
        "HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK",
    ),
    "ciphersuites": (
        "src: `TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256` (pod lists CHACHA first)",
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
    ),
    "curves": (
        "`X25519:P-256:X448:P-521:P-384` (FIPS: `P-256:P-521:P-384`)",
        "X25519:P-256:X448:P-521:P-384",
    ),
    "securityLevel": ("2", 2),
    "sessionCacheSize": ("1000 (src)", 1000),
    "sessionCacheTimeout": ("300 (src)", 300),
    "failover": ("prio", "prio"),
    "client": ("no", False),
    "reset": ("yes", True),
    "sessionResume": ("yes", True),
    "renegotiation": ("yes", True),
    "requireCert": ("no", False),
    "delay": ("no", False),
    "retry": ("no", 0),
    "logId": ("sequential", "sequential"),
    "stack": ("65536 (131072 on some builds)", 65536),
    "RNDbytes": ("1024", 1024),
    "RNDfile": ("build default (Debian: /dev/urandom)", "/dev/urandom"),
    "RNDoverwrite": ("yes", True),
    "syslog": ("yes", True),
    "service": ("`stunnel`", "stunnel"),
    "log": ("append", "append"),
    "foreground": ("background", "no"),
    "chroot": ("none", None),
    "output": ("none", None),
    "accept": ("none", []),
    "connect": ("none", []),
    "CAfile": ("none", None),
    "CApath": ("none", None),
    "CRLfile": ("none", None),
    "CRLpath": ("none", None),
    "cert": ("none (required in server mode)", None),
    "key": ("value of `cert`", Unset("the cert file")),  # unset: the key is read from the cert
    "checkHost": ("no check", []),
    "checkIP": ("no check", []),
    "checkEmail": ("no check", []),
    "verify": ("none", None),
    "verifyChain": ("no", Unset(False)),  # unset: no in stunnel mode, `pytunnel run` decides
    "verifyPeer": ("no", Unset(False)),
    "sslVersionMax": ("all", Unset("all")),
}
#: the debug row appears in both tables with different wording
DEBUG_DEFAULT_CELLS = {"global": "`daemon.notice` (5)", "service": "notice"}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_documented_default(name: str) -> None:
    cell, expected = DEFAULTS[name]
    cells = {r.default for r in ROWS if name in r.names}
    assert cells == {cell}, f"the reference now says {cells} for {name}: update DEFAULTS"
    value = model_default(name)
    if isinstance(expected, Unset):
        assert value is None or value == expected.means
    else:
        assert value == expected


def test_debug_default_is_notice() -> None:
    for row in ROWS:
        if "debug" in row.names:
            assert row.default == DEBUG_DEFAULT_CELLS[row.table]
    assert model_default("debug") == ("daemon", 5)


def test_defaults_reach_a_loaded_service(tmp_path: Path) -> None:
    s = conf.load(str(write_config(tmp_path, [], dict(BASE))))
    svc = s.services[0]
    for name, (_, expected) in DEFAULTS.items():
        if name in BASE:
            continue
        model = s.globals if canon(name) in GLOBAL_FIELDS else svc
        value = getattr(model, canon(name))
        if isinstance(expected, Unset):
            assert value is None or value == expected.means, name
        else:
            assert value == expected, name
    assert svc.debug == ("daemon", 5) and s.log_level == 5


# ------------------------------------------------------------------ supported options land in the model

#: a valid value for every supported option and what the model must hold afterwards; the value
#: differs from the default so a dropped line cannot pass for a kept one
SAMPLES: dict[str, tuple[str, object]] = {
    # global table
    "chroot": ("/var/empty", "/var/empty"),
    "debug": ("info", ("daemon", 6)),
    "foreground": ("quiet", "quiet"),
    "log": ("overwrite", "overwrite"),
    "output": ("/tmp/pytunnel-test.log", "/tmp/pytunnel-test.log"),
    "pid": ("/tmp/pytunnel-test.pid", "/tmp/pytunnel-test.pid"),
    "RNDbytes": ("64", 64),
    "RNDfile": ("/tmp/seed", "/tmp/seed"),
    "RNDoverwrite": ("no", False),
    "service": ("smtps-in", "smtps-in"),
    "syslog": ("no", False),
    "setuid": ("nobody", "nobody"),
    "setgid": ("nogroup", "nogroup"),
    # service table
    "accept": ("[::1]:0", [Endpoint("::1", 0)]),
    "connect": ("smtp.example.com:465", [Endpoint("smtp.example.com", 465)]),
    "CApath": ("/etc/ssl/certs", "/etc/ssl/certs"),
    "CAfile": ("/x/ca.pem", "/x/ca.pem"),
    "cert": ("/x/cert.pem", "/x/cert.pem"),
    "key": ("/x/key.pem", "/x/key.pem"),
    "checkEmail": ("admin@example.com", ["admin@example.com"]),
    "checkHost": ("mail.example.com", ["mail.example.com"]),
    "checkIP": ("::1", ["::1"]),
    "ciphers": ("HIGH:!aNULL:!MD5", "HIGH:!aNULL:!MD5"),
    "ciphersuites": ("TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
    "client": ("yes", True),
    "CRLpath": ("/x/crl.d", "/x/crl.d"),
    "CRLfile": ("/x/crl.pem", "/x/crl.pem"),
    "curves": ("P-384:X25519", "P-384:X25519"),
    "curve": ("secp384r1", "secp384r1"),
    "logId": ("unique", "unique"),
    "delay": ("yes", True),
    "failover": ("rr", "rr"),
    "local": ("127.0.0.2", "127.0.0.2"),
    "options": ("NO_TICKET", ["NO_TICKET"]),
    "renegotiation": ("no", False),
    "requireCert": ("yes", True),
    "reset": ("no", False),
    "retry": ("yes", 1000),
    "securityLevel": ("3", 3),
    "sessionCacheSize": ("10", 10),
    "sessionCacheTimeout": ("60", 60),
    "session": ("60", 60),
    "redirect": ("127.0.0.1:8443", [Endpoint("127.0.0.1", 8443)]),
    "ticketKeySecret": (
        "00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff",
        bytes.fromhex("00112233445566778899aabbccddeeff"),
    ),
    "ticketMacSecret": ("ff" * 32, b"\xff" * 32),
    "PSKsecrets": ("/x/psk.txt", "/x/psk.txt"),
    "OCSP": ("http://ocsp.example/", "http://ocsp.example/"),
    "config": ("MinProtocol:TLSv1.3", ["MinProtocol:TLSv1.3"]),
    "CAstore": ("file:/etc/ssl/certs", "file:/etc/ssl/certs"),
    "OCSPaia": ("yes", True),
    "OCSPflag": ("NOINTERN", ["NOINTERN"]),
    "OCSPnonce": ("yes", True),
    "OCSPrequire": ("no", False),
    "TIMEOUTocsp": ("9", 9),
    "PSKidentity": ("alice", "alice"),
    "sessionResume": ("no", False),
    "sni": ("mail.example.com", "mail.example.com"),
    "protocol": ("smtp", "smtp"),
    "ident": ("nobody", "nobody"),
    "exec": ("/bin/cat", "/bin/cat"),
    "pty": ("yes", True),
    "execArgs": ("cat -u", "cat -u"),
    "setEnv": ("LANG=C", ["LANG=C"]),
    "protocolAuthentication": ("login", "login"),
    "protocolHost": ("mail.example.com", "mail.example.com"),
    "protocolHeader": ("X-Test: 1", ["X-Test: 1"]),
    "protocolUsername": ("user", "user"),
    "protocolPassword": ("secret", "secret"),
    "socket": ("r:SO_KEEPALIVE=yes", [SocketOption(where="r", name="SO_KEEPALIVE", value=1)]),
    "sslVersion": ("TLSv1.3", "TLSv1.3"),
    "sslVersionMax": ("TLSv1.2", "TLSv1.2"),
    "sslVersionMin": ("TLSv1.3", "TLSv1.3"),
    "stack": ("131072", 131072),
    "TIMEOUTbusy": ("1", 1),
    "TIMEOUTclose": ("0", 0),
    "TIMEOUTconnect": ("2", 2),
    "TIMEOUTidle": ("3", 3),
    "verify": ("2", 2),
    "verifyChain": ("yes", True),
    "verifyPeer": ("yes", True),
    "transparent": ("source", "source"),
}
#: handled by the reader, not stored in the model (tested below)
STRUCTURAL = {"include"}
SUPPORTED = [(t, n) for t, n in NAMES if not unsupported(n) and canon(n) not in STRUCTURAL]


def check_lands(settings: Settings, name: str, expected: object, *, as_default: bool) -> None:
    c = canon(name)
    if c in GLOBAL_FIELDS:
        assert getattr(settings.globals, c) == expected
        return
    svc = settings.services[0]
    assert getattr(svc, c) == expected, f"{name} = ... did not reach the service"
    if as_default:
        assert getattr(settings.defaults, c) == expected


@pytest.mark.parametrize(("table", "name"), SUPPORTED, ids=[f"{t}-{n}" for t, n in SUPPORTED])
def test_supported_option_lands_in_the_model(tmp_path: Path, table: str, name: str) -> None:
    assert name in SAMPLES, f"supported option {name} has no sample value in this test"
    value, expected = SAMPLES[name]
    assert expected != model_default(name), f"the sample for {name} must differ from its default"
    line = f"{name} = {value}"
    if table == "global":
        path = write_config(tmp_path, [line], dict(BASE))
        check_lands(conf.load(str(path)), name, expected, as_default=True)
        return
    # inside the section ...
    path = write_config(tmp_path, [], section_for(name), [line])
    check_lands(conf.load(str(path)), name, expected, as_default=False)
    # ... and in the global section, as the default for every service
    path = write_config(tmp_path, [line], section_for(name))
    check_lands(conf.load(str(path)), name, expected, as_default=True)


def test_include_works(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    inc.mkdir()
    (inc / "svc.conf").write_text("[inc]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n")
    path = tmp_path / "stunnel.conf"
    path.write_text(f"include = {inc}\n")
    assert [s.name for s in conf.load(str(path)).services] == ["inc"]


def test_server_mode_sni_lands_in_the_model(tmp_path: Path) -> None:
    path = tmp_path / "stunnel.conf"
    path.write_text(
        "[primary]\ncert = /x/server.pem\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"
        "[virtual]\ncert = /x/server.pem\nsni = primary:*.example.com\nconnect = 127.0.0.1:10\n"
    )
    s = conf.load(str(path))
    assert [svc.sni for svc in s.services] == [None, "primary:*.example.com"]


def test_documented_default_options_are_accepted(tmp_path: Path) -> None:
    # the reference's default `options` are NO_SSLv2, NO_SSLv3: writing them out must load
    path = write_config(tmp_path, [], dict(BASE), ["options = NO_SSLv2", "options = NO_SSLv3"])
    assert conf.load(str(path)).services[0].options == ["NO_SSLv2", "NO_SSLv3"]


# ------------------------------------------------------------------ unsupported options are rejected

#: a value that switches each unsupported option *on*
ON_VALUES: dict[str, str] = {
    "compression": "zlib",
    "EGD": "/var/run/egd-pool",
    "engine": "auto",
    "engineCtrl": "SO_PATH:/usr/lib/engines/pkcs11.so",
    "engineDefault": "ALL",
    "fips": "yes",
    "iconActive": "active.ico",
    "iconError": "error.ico",
    "iconIdle": "idle.ico",
    "provider": "legacy",
    "providerParameter": "default:foo=bar",
    "setEnv": "FOO=bar",
    "taskbar": "yes",
    "CAengine": "pkcs11",
    "CAstore": "org.openssl.winstore://",
    "config": "Options:ServerPreference",
    "engineId": "pkcs11",
    "engineNum": "1",
    "exec": "/usr/sbin/in.ftpd",
    "execArgs": "in.ftpd -l",
    "ident": "nobody",
    "libwrap": "yes",
    "OCSP": "http://ocsp.example.com/",
    "OCSPaia": "yes",
    "OCSPflag": "NOCERTS",
    "OCSPnonce": "yes",
    "OCSPrequire": "yes",
    "TIMEOUTocsp": "5",
    "protocol": "smtp",
    "protocolAuthentication": "plain",
    "protocolDomain": "EXAMPLE",
    "protocolHeader": "X-Forwarded-For: 127.0.0.1",
    "protocolHost": "mail.example.com:25",
    "protocolPassword": "secret",
    "protocolUsername": "user",
    "PSKidentity": "client1",
    "PSKsecrets": "/x/psk.txt",
    "redirect": "127.0.0.1:8443",
    "sessiond": "127.0.0.1:54321",
    "ticketKeySecret": "6c:39:4f:31:21:96:de:7c:c2:e6:6a:46:f8:4d:09:2a",
    "ticketMacSecret": "f8:7a:1a:3e:6a:b1:a3:e6:0e:d2:3e:71:30:fb:41:a8",
    "transparent": "source",
}
UNSUPPORTED = [(t, n) for t, n in NAMES if unsupported(n)]


def check_rejection(problems: list[Problem], name: str, line: str, number: int) -> None:
    why = unsupported(name)
    assert why, name
    p = next((p for p in problems if p.line == number), None)
    assert p is not None, [q.render() for q in problems]
    assert p.text == line
    assert why in p.message  # the reason itself, not a generic "unknown option"
    assert name.lower() in p.render().lower()  # the report names the option


@pytest.mark.parametrize(("table", "name"), UNSUPPORTED, ids=[f"{t}-{n}" for t, n in UNSUPPORTED])
def test_unsupported_option_is_rejected_with_its_reason(tmp_path: Path, table: str, name: str) -> None:
    assert name in ON_VALUES, f"unsupported option {name} has no 'on' value in this test"
    assert unsupported(name), "a rejection needs a non-empty reason"
    value = ON_VALUES[name]
    assert value.lower() not in field_meta(canon(name)).get("accepted", [])
    line = f"{name} = {value}"
    # where the reference puts it
    if table == "global":
        problems = rejected(write_config(tmp_path, [line], dict(BASE)))
        check_rejection(problems, name, line, 1)
        return
    problems = rejected(write_config(tmp_path, [], dict(BASE), [line]))
    check_rejection(problems, name, line, 5)
    # and as a global default for the services
    problems = rejected(write_config(tmp_path, [line], dict(BASE)))
    check_rejection(problems, name, line, 1)


ACCEPTED = sorted(
    (n, v) for t, n in UNSUPPORTED for v in field_meta(canon(n)).get("accepted", [])
)  # fmt: skip


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_off_value_of_an_unsupported_option_is_accepted(tmp_path: Path, name: str, value: str) -> None:
    line = f"{name} = {value}"
    glob = [line] if canon(name) in GLOBAL_FIELDS else []
    extra = [] if glob else [line]
    s = conf.load(str(write_config(tmp_path, glob, dict(BASE), extra)))
    model = s.globals if glob else s.services[0]
    assert getattr(model, canon(name)) in (None, []), "an 'off' value must change nothing"


def test_documented_off_defaults_of_unsupported_options_are_accepted() -> None:
    # fips = no, libwrap = no: a config that spells out stunnel's default must not be refused
    wanted: set[tuple[str, str]] = set()
    for row in ROWS:
        alternatives = {a.strip("` ").split()[0].lower() for a in row.value.split("\\|") if a.strip()}
        if row.default in ("no", "none") and row.default in alternatives:
            wanted.update((n, row.default) for n in row.names if unsupported(n))
    assert wanted >= {("fips", "no"), ("libwrap", "no")}
    assert wanted <= set(ACCEPTED), wanted - set(ACCEPTED)


WINDOWS_OR_GUI = {"taskbar", "iconActive", "iconError", "iconIdle"}


def test_windows_and_gui_only_options_are_rejected() -> None:
    marked = {n for r in ROWS if {"W", "GUI"} & {t.strip() for t in r.notes.split(",")} for n in r.names}
    assert marked == WINDOWS_OR_GUI
    for name in marked:
        why = unsupported(name)
        assert why and "Windows" in why, name
        assert not field_meta(canon(name)).get("accepted"), f"{name}: no value of it can work here"

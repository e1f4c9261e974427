"""Every option row of the stunnel reference is either accepted (with its documented
default, and it really lands in the model) or rejected with a reason.  Nothing is dropped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunnel import conf
from tunnel.errors import ConfigError
from tunnel.settings import CANONICAL, GLOBAL_FIELDS, SERVICE_FIELDS, field_meta

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "stunnel-reference.md"

# The option names of stunnel 5.75's global and service tables (kept here too, so the
# test still runs where shared/ is absent; checked against the file when it is present).
OPTIONS = [
    "chroot",
    "compression",
    "debug",
    "EGD",
    "engine",
    "engineCtrl",
    "engineDefault",
    "fips",
    "foreground",
    "iconActive",
    "iconError",
    "iconIdle",
    "log",
    "output",
    "pid",
    "provider",
    "providerParameter",
    "RNDbytes",
    "RNDfile",
    "RNDoverwrite",
    "service",
    "setEnv",
    "syslog",
    "taskbar",
    "setuid",
    "setgid",
    "accept",
    "CAengine",
    "CApath",
    "CAfile",
    "CAstore",
    "cert",
    "checkEmail",
    "checkHost",
    "checkIP",
    "ciphers",
    "ciphersuites",
    "client",
    "config",
    "connect",
    "CRLpath",
    "CRLfile",
    "curves",
    "curve",
    "logId",
    "delay",
    "engineId",
    "engineNum",
    "exec",
    "execArgs",
    "failover",
    "ident",
    "include",
    "key",
    "libwrap",
    "local",
    "OCSP",
    "OCSPaia",
    "OCSPflag",
    "OCSPnonce",
    "OCSPrequire",
    "options",
    "protocol",
    "protocolAuthentication",
    "protocolDomain",
    "protocolHeader",
    "protocolHost",
    "protocolPassword",
    "protocolUsername",
    "PSKidentity",
    "PSKsecrets",
    "pty",
    "redirect",
    "renegotiation",
    "requireCert",
    "reset",
    "retry",
    "securityLevel",
    "sessionCacheSize",
    "sessionCacheTimeout",
    "session",
    "sessionResume",
    "sessiond",
    "sni",
    "socket",
    "sslVersion",
    "sslVersionMax",
    "sslVersionMin",
    "stack",
    "ticketKeySecret",
    "ticketMacSecret",
    "TIMEOUTbusy",
    "TIMEOUTclose",
    "TIMEOUTconnect",
    "TIMEOUTidle",
    "TIMEOUTocsp",
    "transparent",
    "verify",
    "verifyChain",
    "verifyPeer",
]

# A valid value for every supported option, and where it lands in the model.
SAMPLES: dict[str, tuple[str, object]] = {
    "chroot": ("/var/empty", "/var/empty"),
    "debug": ("info", ("daemon", 6)),
    "foreground": ("quiet", "quiet"),
    "log": ("overwrite", "overwrite"),
    "output": ("/tmp/x.log", "/tmp/x.log"),
    "pid": ("/tmp/x.pid", "/tmp/x.pid"),
    "RNDbytes": ("64", 64),
    "RNDfile": ("/dev/urandom", "/dev/urandom"),
    "RNDoverwrite": ("no", False),
    "service": ("moo", "moo"),
    "syslog": ("no", False),
    "setuid": ("nobody", "nobody"),
    "setgid": ("nogroup", "nogroup"),
    "CApath": ("/etc/ssl/certs", "/etc/ssl/certs"),
    "CAfile": ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt"),
    "cert": ("/x/cert.pem", "/x/cert.pem"),
    "key": ("/x/key.pem", "/x/key.pem"),
    "checkEmail": ("a@b.example", ["a@b.example"]),
    "checkHost": ("a.example", ["a.example"]),
    "checkIP": ("127.0.0.1", ["127.0.0.1"]),
    "ciphers": ("HIGH", "HIGH"),
    "ciphersuites": (
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
    ),
    "client": ("yes", True),
    "CRLpath": ("/x/crl", "/x/crl"),
    "CRLfile": ("/x/crl.pem", "/x/crl.pem"),
    "curves": ("prime256v1", "prime256v1"),
    "curve": ("secp384r1", "secp384r1"),
    "logId": ("unique", "unique"),
    "delay": ("yes", True),
    "failover": ("rr", "rr"),
    "local": ("127.0.0.1", "127.0.0.1"),
    "options": ("NO_TICKET", ["NO_TICKET"]),
    "renegotiation": ("no", False),
    "requireCert": ("yes", True),
    "reset": ("no", False),
    "retry": ("250", 250),
    "securityLevel": ("3", 3),
    "sessionCacheSize": ("1000", 1000),
    "sessionCacheTimeout": ("300", 300),
    "session": ("300", 300),
    "sessionResume": ("no", False),
    "sni": ("mail.example", "mail.example"),
    "sslVersion": ("TLSv1.3", "TLSv1.3"),
    "sslVersionMax": ("TLSv1.3", "TLSv1.3"),
    "sslVersionMin": ("TLSv1.2", "TLSv1.2"),
    "stack": ("65536", 65536),
    "TIMEOUTbusy": ("1", 1),
    "TIMEOUTclose": ("0", 0),
    "TIMEOUTconnect": ("2", 2),
    "TIMEOUTidle": ("3", 3),
    "verify": ("2", 2),
    "verifyChain": ("yes", True),
    "verifyPeer": ("yes", True),
}
STRUCTURAL = {"accept", "connect", "socket", "include"}  # tested in test_reader.py
DEFAULTS = {
    "TIMEOUTbusy": 300, "TIMEOUTclose": 60, "TIMEOUTconnect": 10, "TIMEOUTidle": 43200,
    "ciphers": "HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK", "curves": "X25519:P-256:X448:P-521:P-384",
    "securityLevel": 2, "sessionCacheSize": 1000, "sessionCacheTimeout": 300, "failover": "prio",
    "client": False, "reset": True, "sessionResume": True, "logId": "sequential", "RNDbytes": 1024,
    "RNDoverwrite": True, "renegotiation": True, "requireCert": False, "delay": False,
    "syslog": True, "service": "stunnel", "log": "append", "RNDfile": "/dev/urandom",
}  # fmt: skip


def test_option_list_matches_the_reference() -> None:
    if not REFERENCE.exists():
        # shared/ sits beside the clone in CI; elsewhere the embedded list stands alone
        assert len(OPTIONS) == len(set(OPTIONS)) > 100
        return
    text = REFERENCE.read_text()
    names: set[str] = set()
    for section in ("## Global options", "## Service-level options"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        for row in body.splitlines():
            if row.startswith("| `"):
                first = row.split("|")[1]
                names.update(re.findall(r"`([A-Za-z]+)`", first))
    assert names == set(OPTIONS), names ^ set(OPTIONS)


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_is_known(name: str) -> None:
    assert name.lower() in CANONICAL, f"{name} is not in the models"


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_is_supported_or_rejected_with_a_reason(tmp_path: Path, name: str) -> None:
    canon = CANONICAL[name.lower()]
    if canon in STRUCTURAL:
        return
    why = field_meta(canon).get("unsupported")
    is_global = canon in GLOBAL_FIELDS
    if why:
        line = f"{name} = yes"  # "on": never one of the accepted "off" values
        body = (
            (line + "\n[s]\nclient = yes\naccept = 1\nconnect = 2\n")
            if is_global
            else (f"[s]\nclient = yes\naccept = 1\nconnect = 2\n{line}\n")
        )
        path = tmp_path / "c.conf"
        path.write_text(body)
        with pytest.raises(ConfigError) as err:
            conf.load(str(path))
        (problem,) = err.value.problems
        assert problem.text == line and problem.line is not None
        assert why in problem.message
        return
    assert name in SAMPLES, f"supported option {name} has no sample value in this test"
    value, expected = SAMPLES[name]
    extra = "verifyChain = yes\nCAfile = /x\n" if canon in ("checkHost", "checkIP", "checkEmail") else ""
    if canon in ("verifyChain", "verifyPeer"):
        extra = "CAfile = /x\n"
    body = (
        (f"{name} = {value}\n[s]\nclient = yes\naccept = 1\nconnect = 2\n")
        if is_global
        else (f"[s]\nclient = yes\naccept = 1\nconnect = 2\n{extra}{name} = {value}\n")
    )
    path = tmp_path / "c.conf"
    path.write_text(body)
    settings = conf.load(str(path))
    model = settings.globals if is_global else settings.services[0]
    assert getattr(model, canon) == expected


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_documented_defaults(name: str) -> None:
    info = SERVICE_FIELDS.get(name) or GLOBAL_FIELDS[name]
    assert info.default == DEFAULTS[name]


def test_windows_and_gui_options_are_rejected() -> None:
    for name in ("taskbar", "iconActive", "iconError", "iconIdle"):
        why = field_meta(name).get("unsupported", "")
        assert "Windows" in why, name

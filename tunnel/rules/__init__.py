"""Every rule between options: small named functions, run in one place.

The reader (``conf.py``) turns lines into typed settings, one value at a time; whether the
values make sense together is decided here.  Each rule is a function that looks at one
service (:class:`Scope`: its settings, where its section starts, inetd mode) and returns
the problems it finds, each a :class:`tunnel.errors.Problem` with a severity; a rule that
finds nothing returns an empty list.  :data:`SERVICE_RULES` lists them in the order they
run and :func:`check_service` runs them; :func:`check_services` runs the rules between
services.  The texts are stunnel's own where tools grep them.

To add a rule: write ``def my_rule(s: Scope) -> list[Problem]`` using :meth:`Scope.problem`
(which names the service and points at the line that set the option) and append it to
:data:`SERVICE_RULES`.  A warning is a Problem with ``severity=Severity.WARNING``; the caller
logs warnings and refuses the configuration only for errors.

Once a service is built and the mode is known, :data:`START_RULES` (run by
:func:`start_warnings` at ``check``, start-up and every reload) give the warnings that do not
refuse a configuration: an unauthenticated client, an exposed plaintext listener, a
certificate about to expire, a readable key, options that do nothing here.

Imports errors, settings, listener (the descriptor budget), alpn and uris (pytunnel's alpn/checkURI values), protocols (its table of protocols and their own checks) and ocsp
(lazily: cryptography is loaded only for a service that asks for OCSP or has a certificate).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunnel import protocols
from tunnel.alpn import parse
from tunnel.errors import Problem, Severity
from tunnel.listener import FD_RESERVE, descriptor_budget
from tunnel.settings import ServiceSettings, version_range
from tunnel.uris import pattern_problem

_VERSIONS = ["SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]


@dataclass(frozen=True)
class Scope:
    """What a service rule sees: the service, where its section starts, inetd mode."""

    svc: ServiceSettings
    where: Problem  # the section header (file, line, text); none in inetd mode
    inetd: bool = False

    def problem(
        self, message: str, hint: str | None = None, *options: str, severity: Severity = Severity.ERROR
    ) -> Problem:
        """``Service [NAME]: message``, pointing at the line that set the first of ``options``
        that was set (the section header otherwise; in inetd mode there is no header)."""
        svc, where = self.svc, self.where
        file, line, text = where.file, where.line, where.text
        for name in options:
            if name in svc.locations:
                file, line, text = svc.locations[name]
                break
        return Problem(f"Service [{svc.name}]: {message}", file, line, text, hint, severity)


Rule = Callable[[Scope], list[Problem]]


def is_secondary(svc: ServiceSettings) -> bool:
    """A server-mode ``sni = SERVICE:PATTERN`` service rides on SERVICE's listener."""
    return not svc.client and bool(svc.sni) and ":" in (svc.sni or "")


def _run_decides(svc: ServiceSettings) -> bool:
    return bool(svc.client) and svc.verifyChain is None and not svc.verifyPeer and svc.verify is None


def _verifies(svc: ServiceSettings) -> list[str]:
    # legacy verify = 1..4 turns on verifyChain (1-3) and/or verifyPeer (3-4), as in stunnel
    return [n for n in ("verifyChain", "verifyPeer", "verify") if getattr(svc, n)]


# ---------------------------------------------------------------- one service


def two_endpoints(s: Scope) -> list[Problem]:
    """A service has exactly two endpoints (stdin/stdout is one in inetd mode)."""
    svc = s.svc
    ends = [n for n in ("accept", "exec", "connect") if getattr(svc, n)]
    if svc.protocol and protocols.decides_endpoint(svc.protocol, bool(svc.client)):
        ends.append("protocol")  # stunnel: a socks server takes each destination from the request
    if svc.transparent in ("destination", "both"):
        ends.append("transparent")  # stunnel: each connection's original destination
    if s.inetd:
        if svc.accept:
            return [s.problem("accept is not valid in inetd mode", "put the options in a [service] section")]
        if len(ends) != 1:
            return [
                s.problem(
                    "Each service must define two endpoints",
                    'stdin/stdout is one: add "connect = [HOST:]PORT" or "exec = PROGRAM" (not both)',
                    "exec",
                )
            ]
        return []
    if is_secondary(svc):
        if not (svc.connect or svc.exec or "transparent" in ends):
            return [s.problem("Each service must define two endpoints", 'add "connect = [HOST:]PORT"')]
        return []
    if len(ends) == 2:
        return []
    if len(ends) == 3 and "transparent" in ends:
        hint = (
            f"transparent = {svc.transparent} connects to each client's original destination: remove connect"
        )
    elif len(ends) == 3 and "protocol" in ends:
        hint = "protocol = socks takes the destination from each request: remove connect"
    elif len(ends) == 3:
        hint = "exec replaces one endpoint: remove accept (exec+connect) or connect (accept+exec)"
    elif not svc.accept and not svc.exec:
        hint = 'add "accept = [HOST:]PORT"'
    else:
        hint = 'add "connect = [HOST:]PORT"'
    return [s.problem("Each service must define two endpoints", hint, "exec")]


def pty_needs_exec(s: Scope) -> list[Problem]:
    svc = s.svc
    if svc.pty and not svc.exec:
        return [s.problem("pty needs exec", "add exec = /path/to/program", "pty")]
    if svc.pty and bool(svc.client) != bool(svc.connect):
        return [
            s.problem(
                "pty = yes needs exec as the plaintext end",
                "use accept + exec in server mode or exec + connect in client mode",
                "pty",
            )
        ]
    return []


def exec_args_need_exec(s: Scope) -> list[Problem]:
    if s.svc.execArgs and not s.svc.exec:
        return [s.problem("execArgs needs exec", "add exec = /path/to/program", "execArgs")]
    return []


def server_needs_certificate(s: Scope) -> list[Problem]:
    svc = s.svc
    if not svc.client and not svc.cert and not svc.PSKsecrets and not svc.ACMEdirectory:
        return [
            s.problem(
                "TLS server needs a certificate",
                "add cert = /path/to/cert.pem (or PSKsecrets = FILE), or set client = yes",
            )
        ]
    return []


def verification_needs_ca(s: Scope) -> list[Problem]:
    svc = s.svc
    verifies = _verifies(svc)
    if verifies and not (svc.CAfile or svc.CApath or svc.CAstore):
        return [
            s.problem(
                'Either "CAengine", "CAfile" or "CApath" has to be configured',
                "add CAfile = /path/to/ca.pem",
                *verifies,
            )
        ]
    return []


def protocol_known(s: Scope) -> list[Problem]:
    """``protocol`` names one of this mode's protocols, with its own options right
    (protocols.check) and an authentication it knows."""
    svc = s.svc
    if svc.protocol is None:
        return []
    if svc.protocol == "":
        return [s.problem("Protocol not supported", _protocol_choices(svc), "protocol")]
    try:
        protocols.lookup(svc.protocol, bool(svc.client))
    except ValueError as exc:
        return [s.problem(str(exc), _protocol_choices(svc), "protocol")]
    out = []
    problem = protocols.check(svc)
    if problem:
        out.append(
            s.problem(problem, "add protocolHost = HOST:PORT (the destination behind the proxy)", "protocol")
        )
    auth = (svc.protocolAuthentication or "").lower()
    allowed = protocols.AUTHENTICATION.get(svc.protocol.lower(), ())
    if auth and auth not in allowed and (auth, svc.protocol.lower()) != ("basic", "smtp"):
        why = protocols.AUTHENTICATION_UNAVAILABLE.get(auth)
        out.append(
            s.problem(
                f"protocolAuthentication = {svc.protocolAuthentication} is not valid "
                f"with protocol = {svc.protocol}",
                why or (f"use one of: {', '.join(allowed)}" if allowed else "remove the line"),
                "protocolAuthentication",
            )
        )
    return out


def _protocol_choices(svc: ServiceSettings) -> str:
    return f"protocol = one of {', '.join(protocols.names(bool(svc.client)))}"


def names_need_verification(s: Scope) -> list[Problem]:
    """checkHost/checkIP/checkEmail need verifyChain or verifyPeer.  A client left at
    verifyChain's default verifies under `pytunnel run`: :func:`names_need_verify` checks
    it when the mode is known."""
    svc = s.svc
    if _checks_names(svc) and not _verifies(svc) and not _run_decides(svc):
        return [
            s.problem(
                'Either "verifyChain" or "verifyPeer" has to be enabled',
                "add verifyChain = yes",
                "checkHost",
                "checkIP",
                "checkEmail",
                "checkURI",
            )
        ]
    return []


def _checks_names(svc: ServiceSettings) -> bool:
    return bool(svc.checkHost or svc.checkIP or svc.checkEmail or svc.checkURI)


def uri_patterns_valid(s: Scope) -> list[Problem]:
    """checkURI (pytunnel): SCHEME://AUTHORITY/PATH, ``*`` only as a whole path segment."""
    out = []
    for pattern in s.svc.checkURI:
        why = pattern_problem(pattern)
        if why:
            out.append(
                s.problem(f"checkURI: {why}", "e.g. checkURI = spiffe://example.org/ns/*/sa/web", "checkURI")
            )
    return out


_ACME = ("ACMEdomain", "ACMEemail", "ACMECAfile", "ACMEchallenge", "ACMEhttp", "ACMEdir", "ACMEtimeout")


def acme_options(s: Scope) -> list[Problem]:
    """ACMEdirectory (pytunnel): a server service whose certificate ACME obtains."""
    svc = s.svc
    if not svc.ACMEdirectory:
        used = [n for n in _ACME if n in svc.model_fields_set and n in svc.locations]
        return (
            [s.problem(f"{used[0]} needs ACMEdirectory", "add ACMEdirectory = URL", used[0])] if used else []
        )
    out = []
    if importlib.util.find_spec("acme") is None:
        why = "ACMEdirectory needs certbot's acme library"
        out.append(
            s.problem(why, "pip install 'pytunnel[acme]' (or apt-get install python3-acme)", "ACMEdirectory")
        )
    if svc.client:
        out.append(
            s.problem("ACMEdirectory is for server mode", "remove it, or client = no", "ACMEdirectory")
        )
    if not svc.ACMEdirectory.startswith("https://"):
        out.append(s.problem("ACMEdirectory must be an https:// URL", None, "ACMEdirectory"))
    if svc.cert or svc.key:
        out.append(
            s.problem(
                "ACMEdirectory obtains the certificate: cert/key must not be set",
                "remove cert and key",
                "cert",
                "key",
            )
        )
    if not svc.ACMEdomain:
        out.append(
            s.problem("ACMEdirectory needs at least one ACMEdomain", "add ACMEdomain = NAME", "ACMEdirectory")
        )
    if svc.ACMEchallenge == "http-01" and svc.ACMEhttp is None:
        out.append(
            s.problem("ACMEchallenge = http-01 needs ACMEhttp", "add ACMEhttp = [HOST:]80", "ACMEchallenge")
        )
    if svc.ACMEchallenge != "http-01" and svc.ACMEhttp is not None:
        out.append(
            s.problem(
                "ACMEhttp is for ACMEchallenge = http-01",
                "remove ACMEhttp, or ACMEchallenge = http-01",
                "ACMEhttp",
            )
        )
    if svc.ACMEchallenge == "tls-alpn-01" and not any(not a.is_unix for a in svc.accept):
        out.append(
            s.problem(
                "tls-alpn-01 is answered on a TCP accept port; there is none", "use http-01", "ACMEchallenge"
            )
        )
    return out


def alpn_valid(s: Scope) -> list[Problem]:
    """alpn (pytunnel): a ','-separated list of protocol names."""
    if s.svc.alpn is None:
        return []
    try:
        parse(s.svc.alpn)
    except ValueError as exc:
        return [s.problem(f"alpn: {exc}", "e.g. alpn = h2,http/1.1", "alpn")]
    return []


def version_range_ordered(s: Scope) -> list[Problem]:
    lo, hi = version_range(s.svc)
    if lo and hi and lo != "all" and hi != "all" and _VERSIONS.index(lo) > _VERSIONS.index(hi):
        return [
            s.problem(
                "Invalid protocol version range",
                "sslVersionMin must not exceed sslVersionMax",
                "sslVersionMin",
                "sslVersionMax",
                "sslVersion",
            )
        ]
    return []


def versions_available(s: Scope) -> list[Problem]:
    lo, hi = version_range(s.svc)
    return [
        s.problem(
            f"{version} is not available in this OpenSSL build",
            "use TLSv1.2 or later",
            option if option in s.svc.locations else "sslVersion",
        )
        for version, option in ((lo, "sslVersionMin"), (hi, "sslVersionMax"))
        if version in ("SSLv2", "SSLv3")
    ]


def ocsp_options_valid(s: Scope) -> list[Problem]:
    svc = s.svc
    if not (svc.OCSPflag or svc.OCSP):
        return []
    from tunnel import ocsp  # imports cryptography: only for a service that asks for OCSP

    out = []
    flag_problem = ocsp.check_flags(svc.OCSPflag)
    if flag_problem:
        out.append(s.problem(flag_problem, "remove the line", "OCSPflag"))
    url_problem = ocsp.check_url(svc.OCSP) if svc.OCSP else None
    if url_problem:
        out.append(s.problem(url_problem, "use the responder's http:// URL", "OCSP"))
    return out


def redirect_in_server_only(s: Scope) -> list[Problem]:
    if s.svc.redirect and s.svc.client:
        return [
            s.problem(
                '"redirect" is unsupported in client sections',
                "remove the line, or set client = no",
                "redirect",
            )
        ]
    return []


def ticket_secrets_together(s: Scope) -> list[Problem]:
    svc = s.svc
    if bool(svc.ticketKeySecret) != bool(svc.ticketMacSecret):
        return [
            s.problem(
                '"ticketKeySecret" and "ticketMacSecret" must be set together',
                "add the other one (16 or 32 bytes in hex)",
                "ticketKeySecret" if svc.ticketKeySecret else "ticketMacSecret",
            )
        ]
    return []


def server_sni_format(s: Scope) -> list[Problem]:
    svc = s.svc
    if svc.sni is not None and not svc.client and ":" not in svc.sni:
        return [
            s.problem(
                "Invalid SNI parameter format",
                "server mode: sni = PRIMARY:PATTERN, e.g. primary:*.example.com",
                "sni",
            )
        ]
    return []


def redirect_needs_verification(s: Scope) -> list[Problem]:
    svc = s.svc
    if svc.redirect and not svc.client and not (svc.verifyChain or svc.verifyPeer or (svc.verify or 0) >= 1):
        return [
            s.problem(
                'Either "verifyChain" or "verifyPeer" has to be enabled for "redirect" to work',
                "add verifyChain = yes (and CAfile)",
                "redirect",
            )
        ]
    return []


def cert_names_a_file(s: Scope) -> list[Problem]:
    if s.svc.cert == "" and "cert" in s.svc.locations:
        return [
            s.problem("cert names no file", "give the certificate file's path, or remove the line", "cert")
        ]
    return []


def debug_facility_global(s: Scope) -> list[Problem]:
    """A syslog facility in ``debug`` is global: a service's own ``debug`` line has a level only."""
    file, line, text = s.svc.locations.get("debug", ("", 0, ""))
    in_section = s.where.line is not None and file == s.where.file and line > s.where.line
    if in_section and "." in text.partition("=")[2]:
        return [
            s.problem(
                "Illegal debug level", "a syslog facility (daemon.info) goes in the global section", "debug"
            )
        ]
    return []


def cap_within_descriptor_budget(s: Scope) -> list[Problem]:
    """``maxConnections`` above what the descriptor limit carries could never be reached: the
    descriptor budget (each connection needs two) would stop accepting first."""
    cap = s.svc.maxConnections
    soft, budget = descriptor_budget()
    if cap and budget and cap > budget:
        return [
            s.problem(
                f"maxConnections = {cap} is beyond the descriptor budget: RLIMIT_NOFILE {soft} "
                f"carries {budget} connections (two descriptors each)",
                f"lower maxConnections to {budget} or less, or raise the limit "
                f"(ulimit -n, systemd LimitNOFILE=) to at least {2 * cap + FD_RESERVE}",
                "maxConnections",
            )
        ]
    return []


#: the rules of one service, in the order they run (and report)
SERVICE_RULES: tuple[Rule, ...] = (
    two_endpoints,
    pty_needs_exec,
    exec_args_need_exec,
    server_needs_certificate,
    verification_needs_ca,
    protocol_known,
    names_need_verification,
    version_range_ordered,
    versions_available,
    ocsp_options_valid,
    redirect_in_server_only,
    ticket_secrets_together,
    server_sni_format,
    redirect_needs_verification,
    cert_names_a_file,
    debug_facility_global,
    cap_within_descriptor_budget,
    uri_patterns_valid,
    alpn_valid,
    acme_options,
)


def check_service(svc: ServiceSettings, where: Problem, inetd: bool) -> list[Problem]:
    """Every rule of one service, in order."""
    scope = Scope(svc, where, inetd)
    return [p for rule in SERVICE_RULES for p in rule(scope)]


# ---------------------------------------------------------------- between services


def sni_primaries(services: Sequence[ServiceSettings], source: str) -> list[Problem]:
    """A server ``sni = PRIMARY:PATTERN`` names another server section that accepts."""
    out = []
    by_name = {s.name: s for s in services}
    for svc in services:
        if not is_secondary(svc):
            continue
        primary = by_name.get((svc.sni or "").split(":", 1)[0])
        why = None
        if primary is None or primary is svc:
            why = (
                "SNI section name not found",
                "sni = PRIMARY:PATTERN names another [section] with accept",
            )
        elif primary.client:
            why = "SNI primary service is a TLS client", "the primary must be a server (client = no)"
        elif not primary.accept:
            why = "SNI primary service accepts no connections", "the primary needs accept"
        elif primary.ACMEdirectory:  # its servername callback answers ACME's tls-alpn-01
            why = "SNI primary service uses ACMEdirectory", "give the ACME service its own accept"
        if why is not None:
            file, line, text = svc.locations.get("sni", (source, None, None))
            out.append(Problem(f"Service [{svc.name}]: {why[0]}", file, line, text, why[1]))
    return out


def acme_outside_a_jail(services: Sequence[ServiceSettings], chroot: str | None) -> list[Problem]:
    """ACME renews for as long as the process runs; inside a ``chroot`` jail its state
    directory, ACMECAfile and the resolver are out of reach, so renewals would fail later."""
    out: list[Problem] = []
    for svc in services:
        if chroot and svc.ACMEdirectory:
            file, line, text = svc.locations.get("ACMEdirectory", ("", 0, ""))
            out.append(
                Problem(
                    f"Service [{svc.name}]: ACMEdirectory cannot renew inside chroot = {chroot}",
                    file or None,
                    line or None,
                    text or None,
                    "remove chroot (pytunnel run's Landlock sandbox confines ACME), or use cert/key files",
                )
            )
    return out


def check_services(
    services: Sequence[ServiceSettings], source: str, chroot: str | None = None
) -> list[Problem]:
    """The rules between services (after each passed its own), and those that need a global."""
    return sni_primaries(services, source) + acme_outside_a_jail(services, chroot)


# ---------------------------------------------------------------- once the mode is known


def names_need_verify(svc: ServiceSettings, secure: bool) -> Problem | None:
    """stunnel's rule for a client at verifyChain's default: checkHost/checkIP/checkEmail
    need verification, which `pytunnel run` turns on by default and stunnel does not."""
    if secure or not _run_decides(svc) or not _checks_names(svc):
        return None
    name = next(n for n in ("checkHost", "checkIP", "checkEmail", "checkURI") if getattr(svc, n))
    file, line, text = svc.locations.get(name, ("", 0, ""))
    return Problem(
        f'Service [{svc.name}]: Either "verifyChain" or "verifyPeer" has to be enabled',
        file,
        line or None,
        text or None,
        "add verifyChain = yes",
    )


from tunnel.rules.start import START_RULES, Started, start_warnings  # noqa: E402

__all__ = ["START_RULES", "Started", "start_warnings"]

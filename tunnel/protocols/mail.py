"""The mail STARTTLS dialogues: smtp, pop3, imap (client and server mode), nntp (client).

Client mode reads the server's greeting on the upstream, passes it on to the app and asks
the server to start TLS; server mode plays the server's part towards the client (with
stunnel's RFC 2487 / RFC 2595 detection of clients that want TLS at once) before the TLS
handshake on the accepted socket.
"""

from __future__ import annotations

import base64
import contextlib

from tunnel.protocols.tap import Ctx, ProtocolError, is_prefix, remote_of

# ------------------------------------------------------------------ smtp


async def smtp_client_middle(ctx: Ctx) -> None:
    remote = ctx.remote
    assert remote is not None
    while True:  # copy the (multiline) greeting to the app
        line = await remote.getline()
        ctx.local.putline(line)
        if not is_prefix(line, "220-"):
            break
    remote.putline(f"EHLO {ctx.settings.protocolHost or 'localhost'}")
    line = await remote.getline()
    while is_prefix(line, "250-"):
        line = await remote.getline()
    if not is_prefix(line, "250 "):
        raise ProtocolError("Remote server is not RFC 1425 compliant")
    remote.putline("STARTTLS")
    line = await remote.getline()
    while is_prefix(line, "220-"):
        line = await remote.getline()
    if not is_prefix(line, "220 "):
        raise ProtocolError("Remote server is not RFC 2487 compliant")


async def smtp_client_late(ctx: Ctx) -> None:
    s = ctx.settings
    if not (s.protocolUsername and s.protocolPassword):
        return
    remote = ctx.remote
    assert remote is not None
    remote.putline(f"EHLO {s.protocolHost or 'localhost'}")
    line = await remote.getline()
    while is_prefix(line, "250-"):
        line = await remote.getline()
    user, password = s.protocolUsername, s.protocolPassword
    if (s.protocolAuthentication or "plain").lower() == "login":
        remote.putline("AUTH LOGIN")
        if not is_prefix(await remote.getline(), "334 "):
            raise ProtocolError("Remote server does not support LOGIN authentication")
        remote.putline(base64.b64encode(user.encode()).decode())
        if not is_prefix(await remote.getline(), "334 "):
            raise ProtocolError("LOGIN authentication failed")
        remote.putline(base64.b64encode(password.encode()).decode())
        if not is_prefix(await remote.getline(), "235 "):
            raise ProtocolError("LOGIN authentication failed")
    else:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        remote.putline(f"AUTH PLAIN {token}")
        if not is_prefix(await remote.getline(), "235 "):
            raise ProtocolError("PLAIN Authentication Failed")


async def smtp_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, ctx.remote
    assert remote is not None
    # RFC 2487 detection: a client that speaks first is not waiting for a greeting
    if await local.readable_within(0.2):
        ctx.log(7, "RFC 2487 not detected")
        return
    ctx.log(7, "RFC 2487 detected")
    line = await remote.getline()
    if not (is_prefix(line, "220 ") or is_prefix(line, "220-")):
        raise ProtocolError("Unknown server welcome")
    head, rest = line[:4], line[4:]
    domain, _, greeting = rest.partition(" ")
    local.putline(f"{head}{domain} stunnel for {greeting}" if greeting else f"{head}{domain} stunnel")
    while is_prefix(line, "220-"):
        line = await remote.getline()
        local.putline(line)
    line = await local.getline()
    if not is_prefix(line, "EHLO "):
        raise ProtocolError("Unknown client EHLO")
    local.putline(f"250-{domain}")
    local.putline("250 STARTTLS")
    line = await local.getline()
    if not is_prefix(line, "STARTTLS"):
        raise ProtocolError("STARTTLS expected")
    local.putline("220 Go ahead")


# ------------------------------------------------------------------ pop3


async def pop3_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    line = await remote.getline()
    if not is_prefix(line, "+OK "):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline(line)
    remote.putline("STLS")
    line = await remote.getline()
    if not is_prefix(line, "+OK "):
        raise ProtocolError("Server does not support TLS")


async def pop3_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, remote_of(ctx)
    line = await remote.getline()
    if not is_prefix(line, "+OK"):
        # stunnel decorates whatever came; a refusal ("-ERR busy") is better passed on as is
        local.putline(line)
        raise ProtocolError("Unknown server welcome")
    local.putline(f"{line} + stunnel")
    line = await local.getline()
    if is_prefix(line, "CAPA"):  # RFC 2449: the client asks what we offer
        local.write(b"+OK Stunnel capability list follows\r\nSTLS\r\n.\r\n")
        line = await local.getline()
    if not is_prefix(line, "STLS"):
        raise ProtocolError("Client does not want TLS")
    local.putline("+OK Stunnel starts TLS negotiation")


# ------------------------------------------------------------------ imap


async def imap_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    line = await remote.getline()
    if not is_prefix(line, "* OK"):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline("* OK Connected.")
    remote.putline("stunnel STARTTLS")
    line = await remote.getline()
    if not is_prefix(line, "stunnel OK"):
        ctx.local.putline("* BYE stunnel: Server does not support TLS")
        raise ProtocolError("Server does not support TLS", reset=False)


async def imap_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, remote_of(ctx)
    # RFC 2595 detection: a client that speaks first wants TLS at once (imaps)
    if await local.readable_within(0.2):
        ctx.log(7, "RFC 2595 not detected")
        return
    ctx.log(7, "RFC 2595 detected")
    line = await remote.getline()
    if not is_prefix(line, "* OK"):
        raise ProtocolError("Unknown server welcome")
    # the greeting's capabilities lack STARTTLS: make the client ask for them instead
    at = line.find("CAPABILITY")
    if at < 0:
        at = line.find("capability")
    if at >= 0:
        line = f"{line[:at]}K{line[at + 1 :]}"
    local.putline(f"{line} (stunnel)")
    reason, level = "", 3
    while True:
        line = await local.getline()
        tag, space, tail = line.partition(" ")
        if not space:
            reason = f"Unexpected client command {line}"
            break
        if is_prefix(tail, "STARTTLS"):
            local.putline(f"{tag} OK Begin TLS negotiation now")
            return
        if is_prefix(tail, "CAPABILITY"):
            remote.putline(line)
            answer = await remote.getline()
            if answer.startswith("*"):
                local.putline(f"{answer} STARTTLS")
                answer = await remote.getline()
            local.putline(answer)
            _tag, _sp, status = answer.partition(" ")
            if not _sp or not is_prefix(status, "OK"):
                local.putline("* BYE unexpected server response")
                reason = f"Unexpected server response: {answer}"
                break
        elif is_prefix(tail, "LOGOUT"):
            local.putline("* BYE server terminating")
            local.putline(f"{tag} OK LOGOUT completed")
            reason, level = "IMAP client logged out before STARTTLS", 6
            break
        else:
            local.putline("* BYE stunnel: unexpected command")
            local.putline(f"{tag} BAD {tail} unexpected")
            reason = f"Unexpected client command {tail}"
            break
    # log out of the server cleanly, then close without a reset
    remote.putline("stunnel LOGOUT")
    with contextlib.suppress(ProtocolError):
        if (await remote.getline()).startswith("*"):
            await remote.getline()
    raise ProtocolError(reason, reset=False, level=level)


# ------------------------------------------------------------------ nntp


async def nntp_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    line = await remote.getline()
    if not (is_prefix(line, "200 ") or is_prefix(line, "201 ")):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline(line)
    remote.putline("STARTTLS")
    line = await remote.getline()
    if not is_prefix(line, "382 "):
        raise ProtocolError("Server does not support TLS")

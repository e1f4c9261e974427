"""Fake servers speaking the pre-TLS dialogues of POP3, IMAP, NNTP, LDAP, PostgreSQL, CIFS,
an HTTP CONNECT proxy, SOCKS5-over-TLS and a PROXY-protocol reader, for the protocol tests.

Each runs an asyncio server on its own thread.  The dialogues follow the RFCs (and the
replies real servers give: Dovecot, INN, slapd, PostgreSQL) up to the TLS upgrade, then
serve a few commands inside TLS, so the tests can move real bytes end to end.

``server.mode`` picks the behaviour of the *next* connections, so one tunnel process sees
a hostile reply and then a good one:

* ``good``          the dialogue as a real server does it
* ``refuse``        the server declines TLS (or the request) in its protocol's words
* ``bad-greeting``  a greeting the client must not accept
* ``garbage``       bytes of another protocol
* ``long-line``     100 KB without a line end, then silence
* ``eof``           the connection closes in the middle of the negotiation
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

LONG = b"x" * 100_000
MESSAGE = [b"From: moo@lambda.test", b"Subject: fake", b"", b"body line 1", b"body line 2"]


class Conn:
    """One accepted connection, with line and byte helpers."""

    def __init__(
        self, server: FakeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.mode = server.mode
        self.tls = writer.get_extra_info("ssl_object") is not None

    async def line(self) -> str | None:
        """A line without CR LF; None at EOF."""
        try:
            raw = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        return raw.rstrip(b"\r\n").decode("utf-8", "replace")

    async def read(self, n: int) -> bytes | None:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return None

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def put(self, *lines: str) -> None:
        self.writer.write(b"".join(line.encode() + b"\r\n" for line in lines))

    async def start_tls(self) -> None:
        assert self.server.tls_context is not None
        await self.writer.drain()
        await self.writer.start_tls(self.server.tls_context)
        self.tls = True

    async def hang(self) -> None:
        """Stay silent until the peer goes away."""
        await self.writer.drain()
        with contextlib.suppress(OSError):
            while await self.reader.read(65536):
                pass

    async def echo(self) -> None:
        with contextlib.suppress(OSError):
            while data := await self.reader.read(65536):
                self.server.note(f"echo tls={self.tls} {len(data)}")
                self.writer.write(data)
                await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


Handler = Callable[[Conn], Awaitable[None]]


class FakeServer:
    """An asyncio TCP server on its own thread.  ``tls_context``: the server side of a TLS
    upgrade (or of the whole connection with ``tls_from_start``)."""

    port: int

    def __init__(
        self,
        handler: Handler,
        tls_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        tls_from_start: bool = False,
    ) -> None:
        self.handler = handler
        self.tls_context = tls_context
        self.mode = "good"
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        ready = threading.Event()

        async def start() -> None:
            self._server = await asyncio.start_server(
                self._accept, host, 0, ssl=tls_context if tls_from_start else None
            )
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        ready.wait(10)
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append(text)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self, reader, writer)
        try:
            await self.handler(conn)
            await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.note(f"error {exc!r}")
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def relay(conn: Conn, host: str, port: int, first: bytes = b"") -> None:
    """Pipe the connection to host:port (what a proxy does once it said yes)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()

    await asyncio.gather(pump(conn.reader, writer), pump(reader, conn.writer))
    writer.close()


# ------------------------------------------------------------------ POP3 (RFC 1939, RFC 2595)


def pop3(starttls: bool) -> Handler:
    """A POP3 maildrop with one message; ``starttls``: offers STLS and wants it before PASS."""

    async def handle(c: Conn) -> None:
        if c.mode == "bad-greeting":
            c.put("-ERR [SYS/TEMP] too busy, try later")
            return
        if c.mode == "long-line":
            c.send(b"+OK " + LONG)
            await c.hang()
            return
        if c.mode == "garbage":
            c.put("SSH-2.0-OpenSSH_9.2p1 Debian-2")
            await c.hang()
            return
        c.put("+OK POP3 fake ready <1896.697170952@dbc.mtview.ca.us>")
        body = b"".join(line + b"\r\n" for line in MESSAGE)
        while (line := await c.line()) is not None:
            cmd = line.split(" ")[0].upper()
            c.server.note(f"{cmd} tls={c.tls}")
            if cmd == "CAPA":
                caps = ["USER", "UIDL"] + (["STLS"] if starttls and not c.tls else [])
                c.put("+OK Capability list follows", *caps, ".")
            elif cmd == "STLS" and starttls and not c.tls:
                if c.mode == "eof":
                    return
                if c.mode == "refuse":
                    c.put("-ERR TLS not available right now")
                    continue
                c.put("+OK Begin TLS negotiation")
                await c.start_tls()
            elif cmd == "USER":
                c.put("+OK send PASS")
            elif cmd == "PASS":
                if starttls and not c.tls:
                    c.put("-ERR [AUTH] Plaintext authentication disallowed on non-secure connections")
                else:
                    c.put("+OK Logged in.")
            elif cmd == "STAT":
                c.put(f"+OK 1 {len(body)}")
            elif cmd == "RETR":
                c.put(f"+OK {len(body)} octets")
                c.send(body + b".\r\n")
            elif cmd == "QUIT":
                c.put("+OK Logging out.")
                return
            else:
                c.put("-ERR Unknown command")

    return handle


# ------------------------------------------------------------------ IMAP (RFC 3501)


def imap(starttls: bool) -> Handler:
    async def handle(c: Conn) -> None:
        if c.mode == "bad-greeting":
            c.put("* BYE Too many connections, try later")
            return
        if c.mode == "long-line":
            c.send(b"* OK " + LONG)
            await c.hang()
            return
        caps = "IMAP4rev1 SASL-IR LITERAL+ " + ("STARTTLS AUTH=PLAIN" if starttls else "AUTH=PLAIN")
        c.put(f"* OK [CAPABILITY {caps}] fake IMAP ready.")
        body = b"".join(line + b"\r\n" for line in MESSAGE)
        while (line := await c.line()) is not None:
            tag, _, rest = line.partition(" ")
            cmd = rest.split(" ")[0].upper()
            c.server.note(f"{cmd} tls={c.tls}" if cmd != "LOGOUT" else f"LOGOUT {tag}")
            if cmd == "CAPABILITY":
                now = "IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN" + (
                    " STARTTLS" if starttls and not c.tls else ""
                )
                c.put(
                    f"* CAPABILITY {now}",
                    f"{tag} OK Pre-login capabilities listed, post-login capabilities have more.",
                )
            elif cmd == "STARTTLS" and starttls and not c.tls:
                if c.mode == "eof":
                    return
                if c.mode == "refuse":
                    c.put(f"{tag} BAD TLS support isn't enabled.")
                    continue
                c.put(f"{tag} OK Begin TLS negotiation now.")
                await c.start_tls()
            elif cmd == "LOGIN":
                c.put(f"{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
            elif cmd == "SELECT":
                c.put(
                    "* FLAGS (\\Seen)", "* 1 EXISTS", "* 0 RECENT", f"{tag} OK [READ-WRITE] Select completed."
                )
            elif cmd == "FETCH":
                c.send(f"* 1 FETCH (RFC822 {{{len(body)}}}\r\n".encode() + body + b")\r\n")
                c.put(f"{tag} OK Fetch completed.")
            elif cmd == "NOOP":
                c.put(f"{tag} OK NOOP completed.")
            elif cmd == "LOGOUT":
                c.put("* BYE Logging out", f"{tag} OK Logout completed.")
                return
            else:
                c.put(f"{tag} BAD Error in IMAP command received by server.")

    return handle


# ------------------------------------------------------------------ NNTP (RFC 3977, RFC 4642)


async def nntp(c: Conn) -> None:
    if c.mode == "bad-greeting":
        c.put("400 Service temporarily unavailable")
        return
    if c.mode == "long-line":
        c.send(b"200 " + LONG)
        await c.hang()
        return
    c.put("200 news.test InterNetNews NNRP server INN 2.7.1 ready (posting ok)")
    while (line := await c.line()) is not None:
        cmd = line.split(" ")[0].upper()
        c.server.note(f"{cmd} tls={c.tls}")
        if cmd == "CAPABILITIES":
            c.put("101 Capability list:", "VERSION 2", "READER", *([] if c.tls else ["STARTTLS"]), ".")
        elif cmd == "STARTTLS" and not c.tls:
            if c.mode == "eof":
                return
            if c.mode == "refuse":
                c.put("580 Can not initiate TLS negotiation")
                continue
            c.put("382 Begin TLS negotiation now")
            await c.start_tls()
        elif cmd == "BODY":
            c.put("222 0 <1@news.test> body")
            c.send(b"".join(line + b"\r\n" for line in MESSAGE[3:]) + b".\r\n")
        elif cmd == "QUIT":
            c.put("205 Bye!")
            return
        else:
            c.put("500 What?")


# ------------------------------------------------------------------ LDAP (RFC 4511, RFC 4513)


def ber(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def ldap_result(msgid: int, op: int, code: int, extra: bytes = b"") -> bytes:
    result = ber(0x0A, bytes([code])) + ber(0x04, b"") + ber(0x04, b"") + extra
    return ber(0x30, ber(0x02, bytes([msgid])) + ber(op, result))


def ldap_bind_request(msgid: int, dn: bytes, password: bytes) -> bytes:
    bind = ber(0x02, b"\x03") + ber(0x04, dn) + ber(0x80, password)
    return ber(0x30, ber(0x02, bytes([msgid])) + ber(0x60, bind))


async def read_ber(c: Conn) -> bytes | None:
    """One whole BER element (tag, length, value)."""
    head = await c.read(2)
    if head is None:
        return None
    size = head[1]
    extra = b""
    if size & 0x80:
        extra = await c.read(size & 0x7F) or b""
        size = int.from_bytes(extra, "big")
    body = await c.read(size)
    return None if body is None else head + extra + body


def parse_ber(data: bytes) -> tuple[int, bytes, bytes]:
    """tag, value, rest."""
    tag, size, at = data[0], data[1], 2
    if size & 0x80:
        n = size & 0x7F
        size, at = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
    return tag, data[at : at + size], data[at + size :]


STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"


async def ldap(c: Conn) -> None:
    """slapd's answers: StartTLS (success, or an error code), then simple binds inside TLS."""
    while (msg := await read_ber(c)) is not None:
        _tag, value, _ = parse_ber(msg)
        _t, msgid_raw, rest = parse_ber(value)
        msgid = msgid_raw[-1]
        op, op_value, _ = parse_ber(rest)
        if op == 0x77:  # ExtendedRequest
            _t, oid, _ = parse_ber(op_value)
            c.server.note(f"extended {oid.decode()} tls={c.tls}")
            c.server.note(f"raw {msg.hex()}")
            if oid != STARTTLS_OID or c.tls:
                c.send(ldap_result(msgid, 0x78, 2))  # protocolError
                continue
            if c.mode == "eof":
                return
            if c.mode == "garbage":
                c.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                await c.hang()
                return
            if c.mode == "refuse":
                c.send(ldap_result(msgid, 0x78, 52))  # unavailable
                continue
            if c.mode == "long-line":  # a 1000-byte answer, WinLDAP length form
                c.send(b"\x30\x84" + (1000).to_bytes(4, "big") + b"\x02\x01\x01" + b"\0" * 997)
                await c.hang()
                return
            if c.mode == "winldap":  # Active Directory: four-byte lengths
                inner = ber(0x0A, b"\0") + ber(0x04, b"") + ber(0x04, b"")
                op_b = b"\x78\x84" + len(inner).to_bytes(4, "big") + inner
                body = ber(0x02, bytes([msgid])) + op_b
                c.send(b"\x30\x84" + len(body).to_bytes(4, "big") + body)
            else:  # slapd: result, matchedDN, diagnosticMessage, responseName
                c.send(ldap_result(msgid, 0x78, 0, ber(0x8A, STARTTLS_OID)))
            await c.start_tls()
        elif op == 0x60:  # BindRequest
            _t, _version, rest = parse_ber(op_value)
            _t, dn, rest = parse_ber(rest)
            _t, password, _ = parse_ber(rest)
            c.server.note(f"bind {dn.decode()} {password.decode()} tls={c.tls}")
            c.send(ldap_result(msgid, 0x61, 0 if c.tls else 13))  # 13: confidentialityRequired
        elif op == 0x42:  # UnbindRequest
            return
        else:
            c.send(ldap_result(msgid, 0x78, 2))


# ------------------------------------------------------------------ PostgreSQL


async def pgsql(c: Conn) -> None:
    """SSLRequest answered with 'S' (or 'N'); inside TLS, echo."""
    request = await c.read(8)
    if request is None:
        return
    c.server.note(f"request {request.hex()}")
    if c.mode == "eof":
        return
    if c.mode == "refuse":
        c.send(b"N")
        await c.hang()
        return
    if c.mode == "garbage":
        c.send(b"E\x00\x00\x00\x10SFATAL\x00\x00")
        return
    c.send(b"S")
    await c.start_tls()
    await c.echo()


# ------------------------------------------------------------------ CIFS (NetBIOS session service)


async def cifs(c: Conn) -> None:
    request = await c.read(4)
    if request is None:
        return
    c.server.note(f"request {request.hex()}")
    answers = {
        "good": b"\x83\x00\x00\x01\x8e",
        "refuse": b"\x83\x00\x00\x01\x81",
        "garbage": b"\x82\x00\x00\x00\x00",
        "long-line": b"\x83\x00\x00\x02\x8e",
    }
    if c.mode == "eof":
        return
    c.send(answers[c.mode])
    if c.mode != "good":
        await c.hang()
        return
    await c.start_tls()
    await c.echo()


# ------------------------------------------------------------------ HTTP CONNECT proxy


async def connect_proxy(c: Conn) -> None:
    """Squid's answers; ``server.password`` set: Basic authentication required."""
    request = await c.line()
    if request is None:
        return
    headers: list[str] = []
    while (line := await c.line()) is not None and line:
        headers.append(line)
    c.server.note(request)
    for header in headers:
        c.server.note(header)
    if c.mode == "eof":
        return
    if c.mode == "garbage":  # an SSH server: its banner, a complaint, and it hangs up
        c.put("SSH-2.0-OpenSSH_9.2p1 Debian-2", "Invalid SSH identification string.")
        return
    if c.mode == "long-line":
        c.send(b"HTTP/1.1 200 " + LONG)
        await c.hang()
        return
    if c.mode == "refuse":
        c.put(
            "HTTP/1.1 407 Proxy Authentication Required",
            "Server: squid/5.7",
            'Proxy-Authenticate: Basic realm="fake"',
            "Content-Length: 0",
            "",
        )
        await c.hang()
        return
    verb, target, _version = request.split(" ")
    host, _, port = target.rpartition(":")
    c.put("HTTP/1.1 200 Connection established", "")
    await c.writer.drain()
    await relay(c, host, int(port))


# ------------------------------------------------------------------ SOCKS5 inside TLS


async def socks5_tls(c: Conn) -> None:
    """A SOCKS5 server behind TLS (what stunnel's socks server mode is)."""
    hello = await c.read(2)
    if hello is None:
        return
    await c.read(hello[1])
    if c.mode == "refuse":
        c.send(b"\x05\xff")
        await c.hang()
        return
    if c.mode == "garbage":
        c.send(b"\x04\x00")
        await c.hang()
        return
    c.send(b"\x05\x00")
    head = await c.read(4)
    if head is None:
        return
    if head[3] == 3:
        size = (await c.read(1) or b"\0")[0]
        host = (await c.read(size) or b"").decode()
    elif head[3] == 1:
        host = socket.inet_ntoa(await c.read(4) or b"\0\0\0\0")
    else:
        host = socket.inet_ntop(socket.AF_INET6, await c.read(16) or bytes(16))
    port = int.from_bytes(await c.read(2) or b"\0\0", "big")
    c.server.note(f"connect atyp={head[3]} {host}:{port}")
    if c.mode == "eof":
        return
    if c.mode == "long-line":  # a refusal: connection refused
        c.send(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
        await c.hang()
        return
    c.send(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", 1080))
    await c.writer.drain()
    await relay(c, host, port)


# ------------------------------------------------------------------ PROXY protocol reader

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_proxy_v2(data: bytes) -> dict[str, Any]:
    """Decode a PROXY v2 header (per haproxy's proxy-protocol.txt, section 2.2)."""
    assert data[:12] == V2_SIGNATURE
    ver_cmd, fam = data[12], data[13]
    size = struct.unpack("!H", data[14:16])[0]
    body = data[16 : 16 + size]
    out: dict[str, Any] = {"version": ver_cmd >> 4, "command": ver_cmd & 0xF, "family": fam}
    if fam == 0x11:
        out["src"] = (socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET, body[4:8]), struct.unpack("!H", body[10:12])[0])
        tlvs = body[12:]
    elif fam == 0x21:
        out["src"] = (socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET6, body[16:32]), struct.unpack("!H", body[34:36])[0])
        tlvs = body[36:]
    else:
        tlvs = b""
    out["tlvs"] = parse_tlvs(tlvs)
    return out


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while len(data) >= 3:
        kind, size = data[0], struct.unpack("!H", data[1:3])[0]
        out[kind] = data[3 : 3 + size]
        data = data[3 + size :]
    return out


async def proxy_reader(c: Conn) -> None:
    """An upstream behind a PROXY-protocol sender (haproxy's accept-proxy): header, then echo."""
    first = await c.read(12)
    if first is None:
        return
    if first == V2_SIGNATURE:
        rest = await c.read(4) or b""
        size = struct.unpack("!H", rest[2:4])[0]
        c.server.note("v2 " + (first + rest + (await c.read(size) or b"")).hex())
    else:
        line = first + (await c.reader.readuntil(b"\n"))
        c.server.note("v1 " + line.decode())
    if c.mode == "eof":
        return
    await c.echo()


async def echo(c: Conn) -> None:
    """Echo (over TLS from the first byte when the server was made with tls_from_start)."""
    await c.echo()

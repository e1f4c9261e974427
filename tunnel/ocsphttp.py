"""The HTTP/1.0 exchange with an OCSP responder: the ``http://`` URL, one POST, and a
careful read of the answer (status line, headers, Content-Length or chunked body, at most
:data:`MAX_RESPONSE` bytes).  ``TIMEOUTocsp`` is applied by the caller around the whole
exchange.

A leaf: it imports nothing from tunnel.  Failures raise :class:`HttpError` (or OSError).
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Callable

MAX_RESPONSE = 1 << 20  # bytes of HTTP body we accept from a responder
MAX_HEADER_LINES = 100
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")


class HttpError(Exception):
    pass


def parse_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, path, Host header) of an ``http://`` responder URL."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError(
            "TLS not supported for OCSP (define a client-mode service for it and use its http URL)"
        )
    if scheme != "http":
        raise ValueError("expected an http:// URL")
    host = parts.hostname
    if not host:
        raise ValueError("no host in the URL")
    port = parts.port or 80  # raises ValueError for a bad port
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    netloc = parts.netloc.rpartition("@")[2]
    if any(c in path + netloc for c in "\r\n ") or not path.startswith("/"):
        raise ValueError("bad characters in the URL")
    return host, port, path, netloc


async def http_post(
    host: str, port: int, path: str, host_header: str, body: bytes, say: Callable[[int, str], None]
) -> bytes:
    """POST an OCSP request over HTTP/1.0; the response body, at most MAX_RESPONSE bytes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        say(7, f"OCSP: Connected {host}:{port}")
        head = (
            f"POST {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: pytunnel\r\n"
            "Content-Type: application/ocsp-request\r\nAccept: application/ocsp-response\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    try:
        status_line = await reader.readline()
        if not status_line:
            raise HttpError("connection closed without a response")
        match = _STATUS_LINE.fullmatch(status_line.decode("latin-1").rstrip("\r\n"))
        if not match:
            raise HttpError(f"not an HTTP status line: {_shorten(status_line)}")
        if match.group(1) != "200":
            raise HttpError(f"HTTP status {match.group(1)} {(match.group(2) or '').strip()}".rstrip())
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise HttpError("connection closed in the headers")
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                break
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                raise HttpError(f"bad header line: {_shorten(line)}")
            name = name.lower()
            value = value.strip()
            if name in headers and headers[name] != value:
                if name in ("content-length", "transfer-encoding"):
                    raise HttpError(f"conflicting {name} headers")
                value = f"{headers[name]}, {value}"
            headers[name] = value
        else:
            raise HttpError(f"more than {MAX_HEADER_LINES} header lines")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader)
        if "content-length" in headers:
            raw = headers["content-length"]
            if not raw.isdigit():
                raise HttpError(f"bad Content-Length: {raw[:40]!r}")
            length = int(raw)
            if length > MAX_RESPONSE:
                raise HttpError(f"response too large ({length} bytes; the limit is {MAX_RESPONSE})")
            try:
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise HttpError(f"truncated body ({len(exc.partial)} of {length} bytes)") from None
        data = bytearray()
        while chunk := await reader.read(65536):
            data += chunk
            if len(data) > MAX_RESPONSE:
                raise HttpError(f"response too large (over {MAX_RESPONSE} bytes)")
        return bytes(data)
    except ValueError as exc:  # StreamReader's line limit (LimitOverrunError is a ValueError here)
        raise HttpError(f"malformed response: {exc}") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    while True:
        line = await reader.readline()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size: {_shorten(line)}") from None
        if size < 0 or len(data) + size > MAX_RESPONSE:
            raise HttpError(f"response too large (over {MAX_RESPONSE} bytes)")
        if size == 0:
            for _ in range(MAX_HEADER_LINES):  # trailers
                if (await reader.readline()).strip() == b"":
                    return bytes(data)
            raise HttpError("too many trailer lines")
        try:
            data += await reader.readexactly(size)
            await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise HttpError("truncated chunked body") from None


def _shorten(raw: bytes) -> str:
    return repr(raw[:60].rstrip(b"\r\n")) + ("..." if len(raw) > 60 else "")

"""Regenerate the options table in README.md from the pydantic models in tunnel/options.py,
and the metric label lists in docs/metrics.md from the enums in tunnel/reasons.py.

    python tools/gen_options_table.py          # rewrite the table between the markers
    python tools/gen_options_table.py --check  # exit 1 when README.md is stale, write nothing
    python tools/gen_options_table.py --print  # print the table only

Columns: option, scope (global/service), default, supported (``yes`` or the reason pytunnel
rejects it), description.  The table lives between ``<!-- options-table:start -->`` and
``<!-- options-table:end -->``; everything outside the markers is left untouched.
Exit status: 0 fine, 1 stale (``--check``), 2 the markers are missing or out of order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunnel.options import GLOBAL_FIELDS, SERVICE_FIELDS, field_meta  # noqa: E402
from tunnel.reasons import CloseReason, HandshakeFailure  # noqa: E402

START, END = "<!-- options-table:start -->", "<!-- options-table:end -->"
REASONS_START, REASONS_END = "<!-- reasons:start -->", "<!-- reasons:end -->"
HEADER = ["| option | scope | default | supported | description |", "|---|---|---|---|---|"]


class MarkersMissing(Exception):
    pass


def cell(text: str) -> str:
    """Make text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _default(name: str, value: object) -> str:
    if field_meta(name).get("repeat"):
        return ""  # repeatable: an empty list
    if name == "debug":
        return "5 (notice)"
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ".".join(str(v) for v in value)
    return cell(str(value))


def rows() -> list[tuple[str, str, str, str, str]]:
    entries = [(n, "global", i) for n, i in GLOBAL_FIELDS.items()]
    entries += [(n, "service", i) for n, i in SERVICE_FIELDS.items()]
    out = []
    for name, scope, info in sorted(entries, key=lambda e: (e[1] != "global", e[0].lower())):
        meta = field_meta(name)
        why = meta.get("unsupported")
        supported = "yes" if not why else f"no: {why}"
        if meta.get("python"):
            supported = f"yes, on Python ≥ {meta['python']} (older: rejected, saying so)"
        if meta.get("extension"):
            supported = "yes (pytunnel extension: stunnel rejects it)"
        if why and meta.get("accepted"):
            supported += f" (accepted: {', '.join(meta['accepted'])})"
        desc = info.description or ""
        if meta.get("repeat"):
            desc += " (repeatable)"
        out.append((name, scope, _default(name, info.default), cell(supported), cell(desc)))
    return out


def table() -> str:
    lines = list(HEADER)
    for name, scope, default, supported, desc in rows():
        lines.append(f"| `{name}` | {scope} | {default} | {supported} | {desc} |")
    return "\n".join(lines)


def reasons() -> str:
    """The label values of the two ``reason`` labels, one row per enum member."""
    lines = ["| metric | `reason` | meaning |", "|---|---|---|"]
    for member in CloseReason:
        lines.append(f"| `pytunnel_connections_total` | `{member.label}` | {cell(_CLOSE_MEANING[member])} |")
    for failure in HandshakeFailure:
        lines.append(
            f"| `pytunnel_handshake_failures_total` | `{failure.label}` | {cell(_meaning(failure))} |"
        )
    return "\n".join(lines)


_CLOSE_MEANING = {
    CloseReason.CLOSED: "both directions ended cleanly (or TIMEOUTclose ran out after one did)",
    CloseReason.PEER_RESET: "a TCP reset or broken pipe from either end",
    CloseReason.IDLE_TIMEOUT: "TIMEOUTidle ran out with both directions open",
    CloseReason.CONNECT_FAILED: "no upstream could be reached, or exec failed",
    CloseReason.HANDSHAKE_FAILED: "the TLS handshake failed or outlived TIMEOUTbusy",
    CloseReason.VERIFY_FAILED: "the peer's certificate was refused (chain, check*, OCSP)",
    CloseReason.PROTOCOL_FAILED: "a protocol = negotiation failed",
    CloseReason.IDENT_REFUSED: "ident = USER: identd named another user, or could not be asked",
    CloseReason.PROXY_HEADER: "acceptProxy: the PROXY header was missing, malformed, oversized or "
    "not complete within TIMEOUTbusy",
    CloseReason.TLS_ERROR: "a TLS record error or alert after the handshake",
    CloseReason.SOCKET_ERROR: "a socket error other than a reset",
    CloseReason.SHUTDOWN: "the process stopped with the connection open",
    CloseReason.INTERNAL_ERROR: "a bug: an exception escaped the connection's opening",
}


def _meaning(failure: HandshakeFailure) -> str:
    return {
        HandshakeFailure.VERIFY_FAILED: "the peer's certificate was refused (chain or check*)",
        HandshakeFailure.PROTOCOL_ERROR: "a TLS alert or a malformed handshake",
        HandshakeFailure.PEER_CLOSED: "the peer closed the connection mid-handshake",
        HandshakeFailure.PEER_RESET: "the peer reset the connection mid-handshake",
        HandshakeFailure.TIMEOUT: "TIMEOUTbusy ran out",
        HandshakeFailure.REDIRECTED: "verification failed and redirect took the client elsewhere",
        HandshakeFailure.OCSP: "OCSP said revoked or unknown, or could not be asked",
        HandshakeFailure.URI_MISMATCH: "checkURI (with any other check*): no URI SAN matched",
        HandshakeFailure.NO_APPLICATION_PROTOCOL: "alpn: the client offered none of the server's protocols",
    }[failure]


def render_region(text: str, start_mark: str, end_mark: str, body: str, what: str) -> str:
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < 0 or end < start or text.count(start_mark) != 1 or text.count(end_mark) != 1:
        raise MarkersMissing(f"{what} needs exactly one {start_mark} line followed by one {end_mark} line")
    return f"{text[: start + len(start_mark)]}\n{body}\n{text[end:]}"


def render(readme: str) -> str:
    """README text with the region between the markers replaced by the current table."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0 or end < start or readme.count(START) != 1 or readme.count(END) != 1:
        raise MarkersMissing(
            f"README.md needs exactly one {START} line followed by one {END} line around the options table"
        )
    head = readme[: start + len(START)]
    tail = readme[end:]
    return f"{head}\n{table()}\n{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README table is stale")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the table")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    parser.add_argument(
        "--metrics-doc", type=Path, default=ROOT / "docs" / "metrics.md", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.print_only:
        print(table())
        return 0
    doc = args.metrics_doc.read_text(encoding="utf-8")
    try:
        wanted_doc = render_region(doc, REASONS_START, REASONS_END, reasons(), str(args.metrics_doc))
    except MarkersMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    if doc != wanted_doc:
        if args.check:
            print(
                f"{args.metrics_doc}: the reason labels are stale: run python tools/gen_options_table.py",
                file=sys.stderr,
            )
            return 1
        args.metrics_doc.write_text(wanted_doc, encoding="utf-8")
    current = args.readme.read_text(encoding="utf-8")
    try:
        wanted = render(current)
    except MarkersMissing as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if current != wanted:
            print(
                f"{args.readme}: the options table is stale: run python tools/gen_options_table.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != wanted:
        args.readme.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

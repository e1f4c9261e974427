"""Hypothesis against the reader: whatever the bytes, loading either succeeds or raises
ConfigError, and every problem is located (file, line, the line as written) when it is about
a line.  Only problems about a whole file (it cannot be read) or, in inetd mode, about the
one implicit service (nothing written to point at) may lack a line number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import conf, envconf
from tunnel.errors import ConfigError, Problem
from tunnel.settings import CANONICAL, Settings

SETTINGS = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

OPTION_NAMES = sorted({*CANONICAL, *CANONICAL.values()})  # lower-case, canonical and aliases


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "cfg").mkdir()  # holds only the file under test (include = . stays small)
    inc = base / "inc.d"
    inc.mkdir()
    (inc / "10-good.conf").write_text("[inc]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n")
    (inc / "20-bad.conf").write_text("[inc-bad]\nclient = perhaps\n  conect = 1\n")
    yield base


def lines_of(path: str, cache: dict[str, list[str]]) -> list[str]:
    """The lines of a file as the reader numbers them, as written (CR/LF and a BOM dropped)."""
    if path not in cache:
        data = Path(path).read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        cache[path] = [raw.decode("utf-8", "replace").rstrip("\r") for raw in data.split(b"\n")]
    return cache[path]


def check_problems(problems: list[Problem], source: str, inetd: bool) -> None:
    assert problems, "ConfigError without problems"
    cache: dict[str, list[str]] = {}
    for p in problems:
        text = p.render()
        assert p.message and p.message in text
        assert p.file is not None, p
        if p.line is None:
            # only whole-file problems may lack a line
            assert p.text is None, p
            whole_file = p.message.startswith("cannot read")
            implicit_service = inetd and p.file == source and p.message.startswith("Service [")
            assert whole_file or implicit_service, f"problem about a line without its line: {text}"
            continue
        lines = lines_of(p.file, cache)
        assert 1 <= p.line <= len(lines), (p, len(lines))
        assert text.startswith(f"{p.file}:{p.line}: "), text
        if p.text is not None:
            # the quote is that line, as written
            assert p.text == lines[p.line - 1], (p, lines[p.line - 1])
            assert f'"{p.text}": ' in text
    assert len(set(problems)) == len(problems), "the same problem twice"
    keys = [(p.file or "", p.line or 0) for p in problems]
    assert keys == sorted(keys), "problems are not in file/line order"


def outcome(load: object) -> tuple[str, object]:
    try:
        result = load()  # type: ignore[operator]
    except ConfigError as exc:
        return "error", exc.problems
    assert isinstance(result, Settings)
    return "ok", result


def check(data: bytes, root: Path) -> None:
    path = root / "cfg" / "stunnel.conf"
    path.write_bytes(data)
    source = str(path)
    raw = conf.read_bytes(data, source)
    inetd = not raw.sections
    # anything but ConfigError escapes from here and fails the test
    from_bytes = outcome(lambda: conf.load_bytes(data, source))
    from_file = outcome(lambda: conf.load(source))
    assert from_bytes[0] == from_file[0]
    if from_file[0] == "error":
        problems = from_file[1]
        assert isinstance(problems, list)
        check_problems(problems, source, inetd)
        assert problems == from_bytes[1], "load() and load_bytes() disagree"
    else:
        s = from_file[1]
        assert isinstance(s, Settings)
        assert s.inetd is inetd
        assert s.services, "a loaded configuration without a service"
        if not inetd:
            assert len({svc.name.lower() for svc in s.services}) == len(s.services)
        assert from_bytes[1] == s


# ------------------------------------------------------------------ arbitrary bytes


@SETTINGS
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes(root: Path, data: bytes) -> None:
    check(data, root)


@SETTINGS
@given(
    lines=st.lists(
        st.binary(max_size=40).filter(lambda b: b"\n" not in b)
        | st.sampled_from([b"[s]", b"\xef\xbb\xbf", b"\r"]),
        max_size=20,
    )
)
def test_arbitrary_lines(root: Path, lines: list[bytes]) -> None:
    check(b"\n".join(lines), root)


# ------------------------------------------------------------------ near-valid configurations

VALUES = [
    "", "yes", "no", "YES", "No", "maybe", "0", "1", "2", "5", "7", "-1", "300", "99999999999999999999",
    "127.0.0.1:0", "::1:0", "[::1]:0", ":::0", "0", "localhost:smtps", "host:", "[::1]443", "[x]:1",
    "a.example.com", "/tmp/pytunnel-fuzz.sock", "unix:/tmp/x", "unix:", "TLSv1.2", "TLSv1.3", "all",
    "SSLv3", "TLSv9", "rr", "prio", "l:TCP_NODELAY=yes", "a:SO_REUSEADDR=no", "r:SO_LINGER=1:0",
    "r:SO_RCVTIMEO=1", "x:FOO=1", "l:SO_BINDTODEVICE=", "NO_TICKET", "-NO_TICKET", "NO_TIKET", "info",
    "local3.debug", "daemon.9", "nofacility.5", "HIGH", "prime256v1", "X25519:P-256",
    "primary:*.example.com", "s:*.example.com", "mail.example.com", "/x/ca.pem", "none", "source",
    ".", "..", "../inc.d", "no-such.d", "a\x00b", "\u00e9t\u00e9", "a ; b", "# x", "=", "[s]",
]  # fmt: skip
SECTION_NAMES = ["s", "S", "primary", "inc", "a b", " x ", "[", "]", "", "s]", "\u00fcml"]
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\n"), max_size=25)


def recase(name: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if f else c.lower() for c, f in zip(name, flips + [False] * len(name), strict=False)
    )


option_line = st.builds(
    lambda lead, name, flips, sp1, sp2, value: f"{lead}{recase(name, flips)}{sp1}={sp2}{value}",
    st.sampled_from(["", " ", "\t", "    "]),
    st.sampled_from(OPTION_NAMES) | st.sampled_from(["conect", "acept", "clinet", "sesion", "curvez"]),
    st.lists(st.booleans(), max_size=20),
    st.sampled_from(["", " ", "  "]),
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(VALUES) | TEXT,
)
section_line = st.builds(
    lambda lead, name, close: f"{lead}[{name}{close}",
    st.sampled_from(["", " "]),
    st.sampled_from(SECTION_NAMES) | st.text("abcxyz-_ 0[]", max_size=6),
    st.sampled_from(["]", "]", "] ", ""]),
)
other_line = st.sampled_from(
    ["", "   ", "; comment", "# comment", "  ; indented", "=", "==", "a=b=c", "just words", "[", "]", "\r"]
)
GOOD_SERVICE = ["[good]", "client = yes", "accept = 127.0.0.1:0", "connect = 127.0.0.1:9"]


@SETTINGS
@given(
    lines=st.lists(st.one_of(option_line, option_line, section_line, other_line), max_size=25),
    good_first=st.booleans(),
    crlf=st.booleans(),
    bom=st.booleans(),
)
def test_near_valid_configs(root: Path, lines: list[str], good_first: bool, crlf: bool, bom: bool) -> None:
    body = (GOOD_SERVICE if good_first else []) + lines
    data = ("\r\n" if crlf else "\n").join(body).encode("utf-8")
    check((b"\xef\xbb\xbf" if bom else b"") + data, root)


@SETTINGS
@given(
    name=st.sampled_from(OPTION_NAMES),
    value=st.sampled_from(VALUES) | TEXT,
    where=st.sampled_from(["global", "section", "both"]),
)
def test_one_option_beside_a_good_service(root: Path, name: str, value: str, where: str) -> None:
    line = f"{name} = {value}"
    head = [line] if where in ("global", "both") else []
    tail = [line] if where in ("section", "both") else []
    check("\n".join([*head, *GOOD_SERVICE, *tail]).encode("utf-8"), root)


def test_include_directory_problems_name_the_included_file(root: Path) -> None:
    # the fixed include.d used by the generators: its bad file must be reported with its own lines
    data = f"include = {root / 'inc.d'}\n".encode()
    path = root / "cfg" / "stunnel.conf"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        conf.load(str(path))
    check_problems(err.value.problems, str(path), inetd=False)
    bad = str(root / "inc.d" / "20-bad.conf")
    assert {(p.file, p.line) for p in err.value.problems} >= {(bad, 2), (bad, 3)}


def test_nul_byte_in_an_include_path_is_a_config_error(root: Path) -> None:
    # os.listdir raises ValueError (not OSError) for an embedded NUL
    path = root / "cfg" / "stunnel.conf"
    path.write_bytes(b"include = a\x00b\n")
    with pytest.raises(ConfigError) as err:
        conf.load(str(path))
    p = next(p for p in err.value.problems if p.line == 1)
    assert p.text == "include = a\x00b" and "NUL" in p.message


# ------------------------------------------------------------------ env-only configuration

ENV_NAMES = sorted(
    {"STUNNEL_SERVICE", "STUNNEL_SERVICE_NAME", "STUNNEL_ACCEPT", "STUNNEL_CONNECT", "STUNNEL_CLIENT"}
    | {var for var, _ in envconf.SERVICE_VARS}
    | {var for var, _ in envconf.GLOBAL_VARS}
)
ENV_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["yes", "no", "127.0.0.1:0", "localhost:465", "smtp", "7", "0", "[x]", "a = b", "/nonexistent"]
    ),
)


@SETTINGS
@given(env=st.dictionaries(st.sampled_from(ENV_NAMES), ENV_VALUES, max_size=10))
def test_env_config_raises_only_config_errors_naming_a_variable(env: dict[str, str]) -> None:
    try:
        built = envconf.build(env)
        built.load()
    except ConfigError as exc:
        for p in exc.problems:
            text = p.render()
            assert p.message
            # every problem names a variable (or says which ones are missing)
            assert "STUNNEL_" in text or p.file == envconf.SOURCE, text

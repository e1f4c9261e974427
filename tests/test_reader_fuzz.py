"""Hypothesis: the reader never fails with anything but ConfigError, and its errors carry lines."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import conf
from tunnel.errors import ConfigError
from tunnel.settings import CANONICAL

NAMES = sorted(set(CANONICAL.values()) - {"include"})
VALUES = st.one_of(
    st.sampled_from(
        ["yes", "no", "0", "1", "-1", "127.0.0.1:0", "::1:0", "[::1]:1", "/tmp/x", "TLSv1.2", "all"]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30),
)
LINE = st.one_of(
    st.builds(lambda n, v: f"{n} = {v}", st.sampled_from(NAMES), VALUES),
    st.builds(lambda n: f"[{n}]", st.text(alphabet="abcxyz-_ 0", max_size=8)),
    st.sampled_from(["", "; c", "# c", "   ", "=", "[", "]", "[]", "a=b=c"]),
)


def _check(data: bytes) -> None:
    try:
        conf.load_bytes(data, "fuzz.conf")
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.render()
            assert p.file == "fuzz.conf"
            if p.text is not None and p.text != "":
                # a problem quoting a line also says which line it is
                assert p.line is not None and p.line >= 1, p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, max_size=25))
def test_near_valid_configs(lines: list[str]) -> None:
    _check("\n".join(lines).encode())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NAMES), VALUES)
def test_one_option_in_a_good_service(name: str, value: str) -> None:
    _check(f"[s]\nclient = yes\naccept = 1\nconnect = 2\n{name} = {value}\n".encode())

"""README's options table is generated from the pydantic models (tools/gen_options_table.py)
and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tunnel.settings import GLOBAL_FIELDS, SERVICE_FIELDS, field_meta

SCRIPT = ROOT / "tools" / "gen_options_table.py"
README = ROOT / "README.md"
START, END = "<!-- options-table:start -->", "<!-- options-table:end -->"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def readme_region() -> str:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        pytest.fail(
            f"README.md lacks the {START} / {END} markers: add them (on their own lines) where the "
            "options table belongs, then run `python tools/gen_options_table.py`"
        )
    return text.split(START, 1)[1].split(END, 1)[0]


def table_rows(region: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in region.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_readme_has_the_markers() -> None:
    region = readme_region()
    assert README.read_text(encoding="utf-8").index(START) < README.read_text(encoding="utf-8").index(END)
    assert region.strip().startswith("| option | scope | default | supported | description |")


def test_readme_options_table_is_up_to_date() -> None:
    readme_region()  # a clear message first when the markers are missing
    out = run("--check")
    assert out.returncode == 0, f"{out.stderr}(run: python tools/gen_options_table.py)"


def test_table_lists_every_option_with_its_scope_default_and_support() -> None:
    rows = table_rows(readme_region())
    models = {**{n: "global" for n in GLOBAL_FIELDS}, **{n: "service" for n in SERVICE_FIELDS}}
    assert set(rows) == set(models)
    for name, scope in models.items():
        option, row_scope, _default, supported, description = rows[name]
        assert option == f"`{name}`" and row_scope == scope, rows[name]
        why = field_meta(name).get("unsupported")
        if field_meta(name).get("python"):  # supported from that Python on, whatever runs the tests
            assert supported.startswith(f"yes, on Python ≥ {field_meta(name)['python']}"), rows[name]
        elif why:
            assert supported.startswith(f"no: {why}".replace("|", "\\|")), rows[name]
        elif field_meta(name).get("extension"):  # pytunnel's own options say so
            assert supported == "yes (pytunnel extension: stunnel does not know it)", rows[name]
        else:
            assert supported == "yes", rows[name]
        assert description, f"{name} has no description in the model"
    assert rows["TIMEOUTidle"][2] == "43200"
    assert rows["client"][2] == "no"
    assert rows["ciphers"][2] == "HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK"
    assert "Windows" in rows["taskbar"][3]


def test_check_fails_on_a_stale_table_and_regeneration_fixes_it(tmp_path: Path) -> None:
    readme_region()
    copy = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    stale = text.replace("| `TIMEOUTidle` | service | 43200 |", "| `TIMEOUTidle` | service | 60 |")
    assert stale != text
    stale = stale.replace(END, "| `bogus` | service |  | yes | not an option |\n" + END)
    copy.write_text(stale, encoding="utf-8")
    out = run("--check", "--readme", str(copy))
    assert out.returncode == 1 and "stale" in out.stderr
    assert copy.read_text(encoding="utf-8") == stale, "--check must not write"
    assert run("--readme", str(copy)).returncode == 0
    assert copy.read_text(encoding="utf-8") == text  # everything outside the markers kept
    assert run("--check", "--readme", str(copy)).returncode == 0


def test_missing_markers_are_reported_clearly(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    copy.write_text("# pytunnel\n\nno table here\n", encoding="utf-8")
    for args in (["--check"], []):
        out = run(*args, "--readme", str(copy))
        assert out.returncode == 2
        assert START in out.stderr and END in out.stderr
    assert copy.read_text(encoding="utf-8") == "# pytunnel\n\nno table here\n"


def test_generated_region_replaces_only_the_old_table(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    copy.write_text(f"before\n{START}\nold junk\n{END}\nafter\n", encoding="utf-8")
    assert run("--readme", str(copy)).returncode == 0
    text = copy.read_text(encoding="utf-8")
    assert text.startswith(f"before\n{START}\n| option | scope |") and text.endswith(f"|\n{END}\nafter\n")
    assert "old junk" not in text
    assert run("--print").stdout.strip() in text


def test_metric_reason_labels_are_generated_from_the_enums(tmp_path: Path) -> None:
    from tunnel.reasons import CloseReason, HandshakeFailure

    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    region = doc.split("<!-- reasons:start -->", 1)[1].split("<!-- reasons:end -->", 1)[0]
    for member in CloseReason:
        assert f"| `pytunnel_connections_total` | `{member.label}` |" in region
    for failure in HandshakeFailure:
        assert f"| `pytunnel_handshake_failures_total` | `{failure.label}` |" in region
    copy = tmp_path / "metrics.md"
    stale = doc.replace(
        "| `pytunnel_handshake_failures_total` | `ocsp` |", "| `pytunnel_handshake_failures_total` | `oscp` |"
    )
    assert stale != doc
    copy.write_text(stale, encoding="utf-8")
    out = run("--check", "--metrics-doc", str(copy))
    assert out.returncode == 1 and "reason labels are stale" in out.stderr
    assert run("--metrics-doc", str(copy)).returncode == 0
    assert copy.read_text(encoding="utf-8") == doc

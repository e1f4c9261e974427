"""README's options table is generated from the models and must not go stale."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_readme_options_table_is_up_to_date() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_options_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_table_covers_every_option() -> None:
    from tunnel.settings import GLOBAL_FIELDS, SERVICE_FIELDS

    readme = (ROOT / "README.md").read_text()
    for name in [*GLOBAL_FIELDS, *SERVICE_FIELDS]:
        assert f"| `{name}` |" in readme, name

"""Regenerate the options table in README.md from the pydantic models.

python tools/gen_options_table.py          # rewrite README.md
python tools/gen_options_table.py --check  # exit 1 when README.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunnel.settings import GLOBAL_FIELDS, SERVICE_FIELDS, ServiceSettings, field_meta  # noqa: E402

START, END = "<!-- options-table:start -->", "<!-- options-table:end -->"


def _default(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):  # debug = (facility, level)
        return f"{value[0]}.{value[1]}"
    return str(value).replace("|", "\\|")


def table() -> str:
    rows = ["| option | scope | default | supported | description |", "|---|---|---|---|---|"]
    entries = [(n, "global", i) for n, i in GLOBAL_FIELDS.items()] + [
        (n, "service", i) for n, i in SERVICE_FIELDS.items()
    ]
    for name, scope, info in sorted(entries, key=lambda e: (e[1] != "global", e[0].lower())):
        meta = field_meta(name)
        why = meta.get("unsupported")
        supported = "yes" if not why else f"no: {why}"
        if why and meta.get("accepted"):
            supported += f" (accepted: {', '.join(meta['accepted'])})"
        default = "" if meta.get("repeat") else _default(info.default)
        if name == "debug":
            default = "5 (notice)"
        desc = (info.description or "").replace("|", "\\|")
        if meta.get("repeat"):
            desc += " (repeatable)"
        rows.append(f"| `{name}` | {scope} | {default} | {supported} | {desc} |")
    assert ServiceSettings.model_fields  # the models are the single source of truth
    return "\n".join(rows)


def render(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = render(current)
    if "--check" in sys.argv[1:]:
        if current != wanted:
            print("README.md options table is stale: run python tools/gen_options_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

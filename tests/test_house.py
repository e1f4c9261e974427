"""The rules of the house (docs/design.md, "Layout: the rooms"), checked on the source.

Every import between ``tunnel/`` modules counts -- at the top, inside functions and under
``if TYPE_CHECKING:`` -- because a circle hidden behind a lazy import is still a circle to
whoever reads the code.  Sizes: no module over 600 lines, no function over 80.  The data path
imports no registry, process, configuration or protocol module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "tunnel"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every tunnel module ``path`` imports, wherever the import statement stands."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == "tunnel":
                continue  # the package's face: __version__ and friends, no code
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_read() -> None:
    edges = graph()
    assert "tunnel.opening" in edges["tunnel.service"]
    assert "tunnel.relay" in edges["tunnel.opening"]
    # a lazy import inside a function counts too
    assert "tunnel.ocsp" in edges["tunnel.opening"]


def test_no_import_circle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES}): split it"


def test_function_sizes() -> None:
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_data_path_knows_no_registry_process_config_or_protocol() -> None:
    allowed = {
        "tunnel",
        "tunnel.reasons",
        "tunnel.sockopts",
        "tunnel.tlsnotes",
        "tunnel.logs",
        "tunnel.ossl",
        "tunnel.relaytypes",
    }
    imported = graph()["tunnel.relay"]
    assert imported <= allowed, f"relay imports {sorted(imported - allowed)}"


def test_the_protocols_package_does_not_import_the_data_path() -> None:
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("tunnel.protocols"):
            assert not targets & {"tunnel.relay", "tunnel.service", "tunnel.opening"}, name


def test_leaves_stay_leaves() -> None:
    edges = graph()
    for leaf in ("tunnel.reasons", "tunnel.tlsnotes", "tunnel.errors", "tunnel.addr"):
        assert not (edges[leaf] - {"tunnel"}), f"{leaf} imports {sorted(edges[leaf])}"
    # the SNI switch speaks to OpenSSL through the bridge, and to nothing above it
    assert edges["tunnel.sni"] - {"tunnel"} <= {"tunnel.ossl", "tunnel.osslconn"}

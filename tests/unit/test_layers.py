"""The package's shape, as docs/architecture.md §2 describes it: no import cycle among the
modules of xksproxy/ (imports inside functions included), no module over 700 lines, the HSM
layer never importing the metrics.  That the request path's lower layers load neither aiohttp
nor python-pkcs11 where they should not is checked in fresh interpreters:
tests/integration/test_layers_imports.py."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import ROOT

PACKAGE = ROOT / "xksproxy"
MAX_LINES = 700


def module_name(path: Path, base: Path) -> str:
    name = ".".join(path.relative_to(base).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body."""
    modules = {module_name(p, root.parent): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "xksproxy"
    pkg.mkdir()
    (pkg / "a.py").write_text("from xksproxy.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from xksproxy import a\n")
    (pkg / "c.py").write_text("import xksproxy.a\n")
    graph = import_graph(pkg)
    assert graph == {
        "xksproxy.a": {"xksproxy.b"},
        "xksproxy.b": {"xksproxy.a"},
        "xksproxy.c": {"xksproxy.a"},
    }
    assert cycles(graph) == [["xksproxy.a", "xksproxy.b"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_no_module_over_700_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_hsm_layer_does_not_import_the_metrics() -> None:
    graph = import_graph(PACKAGE)
    hsm = {m: sorted(t) for m, t in graph.items() if m.startswith("xksproxy.hsm")}
    assert {m: t for m, t in hsm.items() if "xksproxy.metrics" in t} == {}


def test_only_the_composition_root_names_the_pkcs11_adapter() -> None:
    """Outside hsm/, the adapter class is named once: app.py builds it; everything else works
    through the Hsm and ManagedHsm protocols (no isinstance, no adapter fields written)."""
    named: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "hsm"):
            continue
        tree = ast.parse(path.read_text())
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "Pkcs11Hsm":
                named.setdefault(str(path.relative_to(ROOT)), []).append(
                    "call" if id(node) in called else "use"
                )
    assert named == {"xksproxy/app.py": ["call"]}


def test_only_the_cli_and_dev_import_the_dev_code() -> None:
    graph = import_graph(PACKAGE)
    outside = {
        m: sorted(t for t in targets if t.startswith("xksproxy.dev"))
        for m, targets in graph.items()
        if not m.startswith(("xksproxy.dev", "xksproxy.cli"))
    }
    assert {m: t for m, t in outside.items() if t} == {}

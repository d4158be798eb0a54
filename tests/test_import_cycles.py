"""No fastbert module imports itself back: every import, at module level or inside a function,
read from the source with ast, makes an edge, and the graph must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import fastbert

PACKAGE = Path(fastbert.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each fastbert module under ``root`` -> the fastbert modules it imports anywhere in its source.

    ``from fastbert.x import y`` is an edge to ``fastbert.x.y`` when that is a module, else to
    ``fastbert.x``; relative imports are resolved against the importing module.
    """
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_fastbert_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_count(tmp_path):
    """The finder sees a cycle closed by an import inside a function, and a relative one."""
    pkg = tmp_path / "fastbert"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fastbert import b\n")
    (pkg / "b.py").write_text("def f():\n    from fastbert.sub.c import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["fastbert.b"] == {"fastbert.sub.c"} and graph["fastbert.sub.c"] == {"fastbert.a"}
    assert find_cycle(graph) == ["fastbert.a", "fastbert.b", "fastbert.sub.c", "fastbert.a"]
    (pkg / "sub" / "c.py").write_text("import fastbert.sub\n")
    assert find_cycle(import_graph(pkg)) is None

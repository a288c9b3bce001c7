"""The package's layers, read from its own import statements (module level and inside functions alike: a
function-local import is still an import): no circle, the schema layer at the bottom, the CLI on top.

``python tests/unit/test_layers.py`` prints the floors (a module's floor is one above the highest module it
imports), the largest modules and any circle.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fastkd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str], source: str | None = None) -> set[str]:
    """The fastkd modules a file of the package (``source``: its text, else read) imports anywhere in it
    (``from a.b import c`` counts as ``a.b.c`` when that is a module, else as ``a.b``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """1 + the highest floor a module imports (an import that closes a circle counts as floor 0)."""
    floor: dict[str, int] = {}

    def of(v):
        if v not in floor:
            floor[v] = 0  # while its imports are asked: a circle back to it ends here
            floor[v] = 1 + max((of(w) for w in edges[v]), default=0)
        return floor[v]

    for v in edges:
        of(v)
    return floor


def test_the_package_has_no_import_circle():
    assert circles(graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floors({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"a": 2, "b": 1, "c": 3}


def test_the_schema_layer_imports_no_stage_and_nothing_below_the_cli_imports_it():
    edges = graph()
    assert edges["fastkd.config"] <= {"fastkd.errors"}
    assert edges["fastkd.io"] <= {"fastkd.errors"} and edges["fastkd.errors"] == set()
    assert edges["fastkd.sweep"] <= {"fastkd.config", "fastkd.errors"}
    users = {name for name, targets in edges.items() if any(t == "fastkd.cli" or t.startswith("fastkd.cli.")
                                                            for t in targets)}
    assert {u for u in users if not u.startswith("fastkd.cli")} <= {"fastkd.__main__", "fastkd.reference_cli",
                                                                     "fastkd.reference_export"}


def test_the_imports_reader_resolves_relative_local_and_from_imports():
    known = {"fastkd", "fastkd.cache", "fastkd.cache.layout", "fastkd.paths", "fastkd.nnunet"}
    source = ("from .layout import ATTR\nfrom fastkd.paths import Paths\nfrom fastkd import nnunet\n"
              "def f():\n    import fastkd.cache.layout\n    from fastkd.cache import reader_name\n")
    assert imports(PACKAGE / "cache" / "x.py", known, source) == {"fastkd.cache", "fastkd.cache.layout", "fastkd.paths",
                                                                  "fastkd.nnunet"}


if __name__ == "__main__":
    edges = graph()
    floor = floors(edges)
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    for level in sorted(set(floor.values()), reverse=True):
        print(f"floor {level:2d}: " + ", ".join(f"{m} ({sizes[m]})" for m in sorted(floor) if floor[m] == level))
    print("circles:", circles(edges) or "none")
    print("largest:", ", ".join(f"{m} {n}" for m, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5]))

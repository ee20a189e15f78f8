"""The package arrows of docs/ARCHITECTURE.md, checked on the source: stores <- e2r core (its key grammar and
errors only) <- e2r.workflow <- pipelines <- bench; the synthetic world (e2r.sim) depends on the core only;
`stores` imports nothing of `e2r`; no import circle between modules; no pipeline imports another; no library
module imports tests/; no project import hidden inside a function; `stores/` keeps a short top level."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("e2r", "stores", "pipelines", "bench", "tests")
MAX_MODULE_LINES = 450
MAX_STORES_TOP_LEVEL = 18        # modules directly in stores/ (its wings: abc/, zarr_v3/, remote/, retrieval/)


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function?, line)`` of every import of a project package."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for n in names:
                if n.split(".")[0] in PROJECT:
                    out.append((n, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def _type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    return isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute)) and \
        getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"


def _module_of(target: str) -> str | None:
    """The project module an import names: ``a.b.c`` if it is a module or package, else its parent (``from
    a.b import name``); None when neither exists."""
    for name in (target, target.rsplit(".", 1)[0]):
        base = ROOT.joinpath(*name.split("."))
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return name
    return None


def _import_graph(*packages: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _modules(*packages):
        me = _name(path)
        graph[me] = {m for target, _, _ in _imports(path) if (m := _module_of(target)) and m != me}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str:
    if module.startswith("e2r.workflow"):
        return "workflow"
    if module.startswith("e2r.sim"):
        return "sim"
    return module.split(".")[0] if module.split(".")[0] != "e2r" else "core"


#: which layers each layer may import
ALLOWED = {
    "core": {"core"},                          # plus the store's key grammar and errors (below)
    "sim": {"core", "sim"},
    "stores": {"stores"},
    "workflow": {"core", "sim", "stores", "workflow"},
    "pipelines": {"core", "sim", "stores", "workflow", "pipelines"},
    "bench": {"core", "sim", "stores", "workflow", "bench"},
}
CORE_MAY_USE = ("stores.keys", "stores.errors")   # the key grammar and its error belong to the store


def test_arrows_run_one_way():
    bad = []
    for path in _modules("e2r", "stores", "pipelines", "bench"):
        me = _layer(_name(path))
        for target, _, line in _imports(path):
            layer = _layer(target)
            ok = layer in ALLOWED[me] or (me in ("core", "sim") and target.startswith(CORE_MAY_USE))
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target} ({layer})")
    assert not bad, "imports against the layer arrows:\n" + "\n".join(bad)


def test_no_pipeline_imports_another_pipeline():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for p in _modules("pipelines") for t, _, line in _imports(p)
           if t.startswith("pipelines.") and not t.startswith("pipelines._common") and t != _name(p)]
    assert not bad, "\n".join(bad)


def test_tests_share_helpers_through_helper_modules_not_other_tests():
    """A test module imports helpers (conftest, tests/*_fixtures.py, tests/fixtures.py), never another test
    module: importing one runs its module-level code and re-registers its fixtures and tests."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for p in _modules("tests") for t, _, line in _imports(p)
           if t.split(".")[:2][-1].startswith("test_") and t.startswith("tests.") and t != _name(p)]
    assert not bad, "test modules importing other test modules:\n" + "\n".join(bad)


def test_no_project_import_inside_a_function():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t} inside a function"
           for p in _modules("e2r", "stores", "pipelines", "bench") for t, inside, line in _imports(p) if inside]
    assert not bad, "\n".join(bad)


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules("e2r", "stores", "pipelines")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, "modules over the size limit:\n" + "\n".join(big)


def test_the_check_sees_a_violation(tmp_path):
    """The import scanner finds a hidden function-level import and a forbidden arrow."""
    bad = tmp_path / "x.py"
    bad.write_text("import stores\n\ndef f():\n    from pipelines import demo\n")
    found = _imports(bad)
    assert ("stores", False, 1) in found and ("pipelines", True, 4) in found
    assert _layer("stores") not in ALLOWED[_layer("e2r.x")]


def test_stores_imports_nothing_of_e2r():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for p in _modules("stores") for t, _, line in _imports(p)
           if t.split(".")[0] == "e2r"]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    circles = _cycles(_import_graph("e2r", "stores", "pipelines", "bench"))
    assert not circles, "modules importing each other (a TYPE_CHECKING import aside):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_stores_top_level_stays_short():
    top = sorted(p.name for p in (ROOT / "stores").glob("*.py"))
    assert len(top) <= MAX_STORES_TOP_LEVEL, f"{len(top)} modules at the top of stores/: {top}"


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []

"""The package arrows of docs/ARCHITECTURE.md, checked on the source: e2r core <- stores <- e2r.workflow <-
pipelines <- bench; the synthetic world (e2r.sim) depends on the core only; no pipeline imports another; no
library module imports tests/; no project import hidden inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("e2r", "stores", "pipelines", "bench", "tests")
MAX_MODULE_LINES = 450


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


def _layer(module: str) -> str:
    if module.startswith("e2r.workflow"):
        return "workflow"
    if module.startswith("e2r.sim"):
        return "sim"
    return module.split(".")[0] if module.split(".")[0] != "e2r" else "core"


#: which layers each layer may import
ALLOWED = {
    "core": {"core"},
    "sim": {"core", "sim"},
    "stores": {"stores"},                      # plus the key grammar and its errors (below)
    "workflow": {"core", "sim", "stores", "workflow"},
    "pipelines": {"core", "sim", "stores", "workflow", "pipelines"},
    "bench": {"core", "sim", "stores", "workflow", "bench"},
}
STORES_MAY_USE = ("stores.keys", "e2r.errors")


def test_arrows_run_one_way():
    bad = []
    for path in _modules("e2r", "stores", "pipelines", "bench"):
        me = _layer(_name(path))
        for target, _, line in _imports(path):
            layer = _layer(target)
            ok = layer in ALLOWED[me] or (me == "stores" and target.startswith(STORES_MAY_USE))
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target} ({layer})")
    assert not bad, "imports against the layer arrows:\n" + "\n".join(bad)


def test_no_pipeline_imports_another_pipeline():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for p in _modules("pipelines") for t, _, line in _imports(p)
           if t.startswith("pipelines.") and not t.startswith("pipelines._common") and t != _name(p)]
    assert not bad, "\n".join(bad)


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

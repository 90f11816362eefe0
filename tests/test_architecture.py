"""The module map holds: imports run one way, and functions stay short.

Read from the source with ``ast`` (function-level imports included; ``if TYPE_CHECKING:`` blocks
excluded, since they never run), so a shortcut that would tangle the layers fails here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cellmorph", "conversion", "ray_jobs")
# Launchers import the library; the library never imports them.
LAUNCHERS = {"cellmorph.cli", "cellmorph.__main__"}
# Modules allowed to import the writer side (conversion/): the CLI and the demo.
MAY_IMPORT_CONVERSION = {"cellmorph.cli", "cellmorph.demo"}
# What conversion/ may use of cellmorph: the store's shared part and its write side, the
# statistics it records, the config and the errors (and remote URLs, atomic writes).
STORE_SHARED = {"cellmorph.store.layout", "cellmorph.store.files", "cellmorph.shardfile"}
CONVERSION_MAY_USE = STORE_SHARED | {
    "cellmorph.store.write", "cellmorph.loaders.stats", "cellmorph.config", "cellmorph.errors",
    "cellmorph.remote", "cellmorph.atomic",
}  # fmt: skip
# `cellmorph inspect` reads stores: the conversion CLI may use the read side too.
CONVERSION_LAUNCHERS = {"conversion.cli", "conversion.__main__"}
READ_SIDE = {"cellmorph.store.read", "cellmorph.store.verify"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
# Modules allowed past the budget, and why (docs/architecture.md says the same).
LONG_MODULES: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = ast.parse(path.read_text(), str(path))
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``tree`` (a package import counts as its __init__)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import sub" names the submodule; "from pkg import func" the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]  # fmt: skip
        else:
            names = []
        for name in names:
            # "from cellmorph import store" names a module; "from x import func" does not.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    g = {m: _imports(tree, m, known) for m, tree in sources.items()}
    # Importing a submodule runs its packages' __init__ first: an edge like any other.
    for m in list(g):
        parent = m.rpartition(".")[0]
        if parent in known and parent != m:
            g[m].add(parent)
    return g


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := dfs(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_no_import_cycles(graph):
    # A package __init__ importing its own submodules is the one cycle Python resolves by
    # design (the submodule's edge back to the package): compare modules outside that pattern.
    edges = {
        m: {n for n in deps if not (m.startswith(n + ".") and n in graph)}
        for m, deps in graph.items()
    }
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_library_never_imports_launchers(graph):
    for module, deps in graph.items():
        if module.startswith("cellmorph") and module not in LAUNCHERS:
            bad = {d for d in deps if d in LAUNCHERS or d.startswith("ray_jobs")}
            assert not bad, f"{module} imports launcher(s) {sorted(bad)}"


def test_library_does_not_import_conversion(graph):
    for module, deps in graph.items():
        if module.startswith("cellmorph") and module not in MAY_IMPORT_CONVERSION:
            bad = {d for d in deps if d.split(".")[0] == "conversion"}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_conversion_uses_only_the_store_write_side_config_and_errors(graph):
    for module, deps in graph.items():
        if module.split(".")[0] == "conversion":
            allowed = CONVERSION_MAY_USE | (READ_SIDE if module in CONVERSION_LAUNCHERS else set())
            used = {d for d in deps if d.split(".")[0] == "cellmorph"} - {"cellmorph"}
            assert used <= allowed, f"{module} uses {sorted(used - allowed)}"


def test_the_store_sides_stay_apart(graph):
    """Readers (loaders, training, evaluation) never import the write side; the write side
    never imports the read side; nobody imports the store package's lazy facade."""
    for module, deps in graph.items():
        if module.startswith(("cellmorph", "conversion", "ray_jobs")):
            assert "cellmorph.store" not in deps or module.startswith("cellmorph.store."), (
                f"{module} imports the cellmorph.store facade; import its submodule"
            )
        if module.startswith("cellmorph.loaders") or module == "cellmorph.store.read":
            assert "cellmorph.store.write" not in deps, f"{module} imports the write side"
        if module == "cellmorph.store.write":
            assert not deps & READ_SIDE, f"{module} imports the read side"


def test_light_modules_stay_light():
    """A checkpoint, the run directory and the store's names load without zarr or pyarrow;
    ``evaluate --report-only`` draws a report without torch."""
    import subprocess
    import sys

    code = (
        "import sys, cellmorph.checkpoint, cellmorph.rundir, cellmorph.store.layout\n"
        "assert 'zarr' not in sys.modules and 'cellmorph.store.read' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    report = "import sys, cellmorph.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", report], check=True, cwd=ROOT)


def test_modules_stay_within_their_budget():
    lengths = {
        _module_name(path): len(path.read_text().splitlines())
        for pkg in PACKAGES
        for path in (ROOT / pkg).rglob("*.py")
    }
    long = {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES and m not in LONG_MODULES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long} (split them, or say why here)"
    stale = sorted(m for m in LONG_MODULES if lengths.get(m, 0) <= MAX_MODULE_LINES)
    assert not stale, f"listed as long but gone or within {MAX_MODULE_LINES} lines: {stale}"


def test_ray_driver_side_does_not_import_torch():
    """The launcher plans and watches; torch and the loaders load only in the workers."""
    tree = ast.parse((ROOT / "cellmorph" / "launch.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top for a in n.names} | {
        n.module for n in top if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not {n for n in names if n.startswith(("torch", "cellmorph.train", "cellmorph.loaders"))}


def test_functions_are_short():
    long = []
    for module, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                start = (
                    body[0].end_lineno if _is_docstring(body[0]) and len(body) > 1 else node.lineno
                )
                n = node.end_lineno - start
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, long


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(getattr(stmt, "value", None), ast.Constant)


def test_train_loop_reads_in_one_screen():
    tree = ast.parse((ROOT / "cellmorph" / "train.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_loop")
    assert loop.end_lineno - loop.lineno + 1 <= 60

"""The package layout stays readable: every module imports alone, no import cycles, no private imports."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import aligned_probing

ROOT = Path(aligned_probing.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(aligned_probing.__path__, "aligned_probing."))


def _module_file(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    return ROOT / rel / "__init__.py" if (ROOT / rel).is_dir() else ROOT / f"{rel}.py"


def _top_level_imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of the module's import statements at module level."""
    tree = ast.parse(_module_file(name).read_text())
    out = []
    for node in tree.body:  # module level only: imports inside functions are deliberate deferrals
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aligned_probing"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("aligned_probing")]
    return out


def test_every_module_imports_on_its_own():
    # One fresh interpreter; before each module, every aligned_probing module is dropped from
    # sys.modules, so an import that only works after another module was imported fails here.
    # (Third-party packages stay loaded: one interpreter per module took 5 minutes.)
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    for k in [k for k in sys.modules if k.startswith('aligned_probing')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as err:\n"
        "        sys.exit(f'import {m} failed: {type(err).__name__}: {err}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_module_level_import_graph_has_no_cycles():
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for module, names in _top_level_imports(name):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in MODULES and target != name:
                    deps.add(target)
        graph[name] = deps
    # A package's __init__ re-exporting its own submodules is not a cycle of concepts.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (d.startswith(name + ".") or name.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name in MODULES:
        tree = ast.parse(_module_file(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aligned_probing"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    is_module = target in MODULES
                    if alias.name.startswith("_") and not is_module and node.module != name:
                        offenders.append(f"{name}: from {node.module} import {alias.name}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Modules imported anywhere in `tree` except under `if TYPE_CHECKING:` (annotations only)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_report_never_imports_the_pipeline():
    for name in [m for m in MODULES if m.startswith("aligned_probing.report")]:
        for module in _runtime_imports(ast.parse(_module_file(name).read_text())):
            assert not module.startswith("aligned_probing.pipeline"), (
                f"{name} imports {module}: the report takes a results object"
            )

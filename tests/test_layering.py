"""cvft's layers: no module imports a layer above its own, and top-level packages import each other in no cycle.

The layers, from the bottom (a module may import its own layer and those below it, at module level or inside a
function; a type-only import counts too):

0. foundation: ``cvft`` itself (``__version__``), ``errors``, ``atomic``, ``_deprecation``, ``signatures``;
1. files and backbones: ``backbones``, ``checkpoints`` (safe loading, downloads), ``runs`` (run folders);
2. ``data``;
3. ``strategies``;
4. what tasks are built from: ``adapters`` / ``adapter_files`` (the adapter file format, over strategies),
   ``continual``, ``detection`` (heads, features and adapter files of detectors);
5. ``tasks``, with the Lightning ``callbacks`` and ``medical`` (metrics, report callback, explanations);
6. tools over tasks: ``export`` (and ``export_quantized``), ``workflows`` (runs chained), ``tuning`` (the
   learning-rate and batch-size finders);
7. the command line: ``cli`` (with ``medical.explain_cli``, the ``cvft explain`` tool);
8. ``compare``, which runs ``cvft fit`` many times.

``cvft`` dispatches ``cvft export|compare|explain`` to those tools by module name at run time
(:data:`cvft.cli.dispatch.TOOLS`), and a name that moved up a layer stays importable from its old module through
:func:`cvft._deprecation.moved_names`, which imports the new module by name when the old name is used. Neither is an
import statement, so neither is checked here; both are the only places that name a module as a string.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cvft"

LAYERS: list[tuple[str, ...]] = [
    ("cvft", "cvft.errors", "cvft.atomic", "cvft._deprecation", "cvft.signatures"),
    ("cvft.backbones", "cvft.checkpoints", "cvft.runs"),
    ("cvft.data",),
    ("cvft.strategies",),
    ("cvft.adapters", "cvft.adapter_files", "cvft.continual", "cvft.detection"),
    ("cvft.tasks", "cvft.callbacks", "cvft.medical"),
    ("cvft.export", "cvft.export_quantized", "cvft.workflows", "cvft.tuning"),
    ("cvft.cli", "cvft.cli_base", "cvft.cli_detection", "cvft.medical.explain_cli"),
    ("cvft.compare",),
]


#: ``(importing module, imported module)`` -> why it is still there. Remove an entry when its import goes.
PENDING: dict[tuple[str, str], str] = {}


def _layer(module: str) -> int:
    """The layer of ``module``: that of the longest prefix listed in :data:`LAYERS`."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to this module's docstring)."
    return best


def _modules() -> dict[str, ast.Module]:
    """Every module under cvft/, by dotted name, parsed."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def _imported(module: str, node: ast.AST) -> list[str]:
    """The cvft modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
            base = ".".join([*package, base]) if base else ".".join(package)
        names = [base]
    else:
        return []
    return [name for name in names if name == "cvft" or name.startswith("cvft.")]


def _imports(module: str, tree: ast.Module, module_level_only: bool) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every cvft import in ``tree``; with ``module_level_only``, those run on import."""
    found = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for name in _imported(module, node):
            if not module_level_only or not (in_function or type_only):
                found.append((name, node.lineno))
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_only or (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
            visit(child, function, guarded)

    visit(tree, False, False)
    return found


def _top_level(module: str) -> str:
    """``cvft.strategies.lora.layer`` -> ``cvft.strategies``."""
    return ".".join(module.split(".")[:2])


def test_no_module_imports_a_higher_layer():
    upward, pending = [], set()
    for module, tree in _modules().items():
        for imported, line in _imports(module, tree, module_level_only=False):
            if _layer(imported) <= _layer(module):
                continue
            if (module, imported) in PENDING:
                pending.add((module, imported))
            else:
                upward.append(f"{module}:{line} imports {imported} (layer {_layer(module)} -> {_layer(imported)})")
    assert not upward, "Imports that go up a layer:\n" + "\n".join(upward)
    assert pending == set(PENDING), f"No longer imported, remove from PENDING: {sorted(set(PENDING) - pending)}"


def test_top_level_packages_import_each_other_in_no_cycle():
    graph: dict[str, set[str]] = {}
    for module, tree in _modules().items():
        for imported, _ in _imports(module, tree, module_level_only=True):
            source, target = _top_level(module), _top_level(imported)
            if source != target and target != "cvft":  # cvft/__init__.py imports nothing of cvft
                graph.setdefault(source, set()).add(target)

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        for target in sorted(graph.get(node, ())):
            found = cycle_from(target, [*path, node])
            if found:
                return found
        return None

    cycles = [cycle for node in sorted(graph) if (cycle := cycle_from(node, []))]
    assert not cycles, "Module-level import cycles between packages: " + "; ".join(" -> ".join(c) for c in cycles)

"""The layering of ARCHITECTURE.md, checked on the source: imports flow one way, no cycles, small modules.

Every `import` statement counts, also inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "inilora_hf"

# Top-level entry (file or folder) of the package -> its layer; ARCHITECTURE.md draws the same picture.
LAYERS = {
    "errors": 0,
    "log": 0,
    "_version": 0,
    "output_dirs": 0,
    "linalg": 1,
    "variants": 1,
    "hub": 1.5,
    "factorsets": 2,
    "adapters": 3,
    "training": 4,
    "convert": 5,
    "comparison": 5,
    "trainer_callbacks": 5,
    "cli": 6,
}
MAX_LINES = 400
# Optional dependency, imported where a quantized layer is handled (not installed by default).
LAZY_IMPORT_ALLOWED = ("bitsandbytes",)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported package module, inside a function?) for every import statement of `path`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                targets = [module] + [f"{module}.{alias.name}" for alias in child.names]
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            for target in targets:
                found.append((target, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    resolved = []
    for target, inner in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            resolved.append((target, inner))
        else:
            resolved.append(("<external>", inner))
    return resolved


def _layer(module: str) -> float:
    parts = module.split(".")
    assert len(parts) > 1, module
    assert parts[1] in LAYERS, f"{module}: add its top-level entry to LAYERS (and to ARCHITECTURE.md)"
    return LAYERS[parts[1]]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == "inilora_hf":  # the public surface re-exports every layer
            continue
        edges = {t for t, _ in _imports(name, path, set(modules)) if t not in ("<external>", "inilora_hf", name)}
        # a package's own __init__ re-exports its children: not an edge of the child
        graph[name] = {t for t in edges if not name.startswith(t + ".")}
    return graph


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_there_is_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert cycles == []


def test_no_import_inside_a_function_except_optional_dependencies():
    modules = _modules()
    lazy = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = [("." * inner.level) + (inner.module or "")]
                else:
                    continue
                lazy += [f"{name}: {n}" for n in names if not n.startswith(LAZY_IMPORT_ALLOWED)]
    assert lazy == []


def test_every_module_is_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}

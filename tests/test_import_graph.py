"""The package's import graph has no cycles, counting imports inside functions as well as at module
level (issue 12: libraries never import the entry points that use them), and a module imports the
package's own modules inside a function only for the reasons listed in LOCAL_IMPORTS."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder -> the package it is installed as (setup.py)
PACKAGES = {"mmt_jax": "mmt_jax", "tasks": "mmt_jax.tasks"}

# module -> package modules it may import inside a function, and why.
LOCAL_IMPORTS = {
    # The command line imports each command's machinery when that command runs, so `mmt-jax --help`
    # and `mmt-jax data ...` start without loading JAX models, orbax or matplotlib.
    "mmt_jax.main": "lazy per command",
}


def _modules() -> dict[str, str]:
    found = {}
    for folder, package in PACKAGES.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    relative = os.path.relpath(path, os.path.join(ROOT, folder))[:-3]
                    module = ".".join([package, *relative.split(os.sep)])
                    found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules) -> list[tuple[str, bool]]:
    """(imported package module, whether the import sits inside a function) for each import."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports module a.b.c if there is one, else names of a.b
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.append((name, id(node) in local))
    return out


def _graph():
    modules = _modules()
    return {module: _imports(path, modules) for module, path in modules.items()}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    # A module's own packages (`mmt_jax` for mmt_jax.data.images) are left out: Python imports
    # them before the module anyway, and their __init__ files import nothing of the package.
    edges = {m: sorted({t for t, _ in targets if t != m and not m.startswith(t + ".")})
             for m, targets in graph.items()}
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_a_planted_cycle_is_found():
    graph = {"a": [("b", False)], "b": [("c", True)], "c": [("a", False)], "d": [("a", False)]}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_function_local_imports_only_where_listed():
    local = sorted({module for module, targets in _graph().items()
                    for _, inside in targets if inside} - set(LOCAL_IMPORTS))
    assert local == [], f"modules importing the package inside functions: {local}"


@pytest.mark.parametrize("module", sorted(LOCAL_IMPORTS))
def test_listed_modules_still_need_their_exception(module):
    assert any(inside for _, inside in _graph()[module])

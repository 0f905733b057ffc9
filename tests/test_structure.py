"""The package's structure: its layers, each importing only from the layers below it; no import cycle among its
modules (function-level imports included, and the subpackage ``__init__`` that importing a module runs first); the
few imports inside functions, each there for a stated reason."""
import ast
import os

import recbole_ur4rec

PACKAGE_DIR = os.path.dirname(recbole_ur4rec.__file__)


def package_modules():
    """Module name -> file of every module of the package (a package is its ``__init__``)."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_modules(path, module, modules):
    """The package modules ``path`` imports anywhere (module level or inside functions)."""

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                parts = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {resolve(name) for name in names if name.startswith("recbole_ur4rec")} - {None, module}
    # importing a.b.c runs a.b's __init__ first (a subpackage; the root package is always imported already),
    # unless a.b is a package the importing module belongs to (being imported already)
    parents = set()
    for name in found:
        parts = name.split(".")
        for depth in range(2, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in modules and not (module == parent or module.startswith(parent + ".")):
                parents.add(parent)
    return found | parents


def import_cycles(graph):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def package_graph():
    modules = package_modules()
    graph = {module: imported_modules(path, module, modules) for module, path in modules.items()}
    for module in graph:  # a package re-exporting its own children is not a cycle by itself
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    return graph


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = package_graph()
    # a module of data importing from model.* runs model/__init__, which imports every model (and data again)
    assert "recbole_ur4rec.data" in graph["recbole_ur4rec.model.duorec"]
    assert "recbole_ur4rec.registry" in graph and "recbole_ur4rec.trainer" in graph["recbole_ur4rec.registry"]
    # function-level imports count: the feddmmr trainer imports the Flower side of a round only when it is chosen
    assert "recbole_ur4rec.federated.flower_nodes" in graph["recbole_ur4rec.trainer.feddmmr_trainer"]
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# The layers, lowest first: a module may import from its own layer and the layers below, never from one above.
LAYERS = (
    ("common",),  # argument parsing, config checks, paths, table/JSON files, checkpoint files
    ("evaluation",),  # slices of evaluated users over RecBole's metrics
    ("data",),  # atomic-file checks, whole-history datasets, splits, cold items
    ("features",),  # item and user text, sentence and CLIP encoders, feature caches
    ("index",),  # the FAISS retrieval memory
    ("federated",),  # rounds, aggregation, nodes, the Flower side of a round (the core the trainer uses)
    ("model",),
    ("trainer",),
    ("registry", "config", "build", "quick_start"),  # one run: lookup, config layering, data and model, train/test
    ("experiments",),  # Ray Tune searches and comparisons over runs
    ("apps",),  # commands and deployments built on whole runs: feature precomputation, partitions, Flower apps
)

# Imports of the plugin's own modules inside functions, and why each is lazy.
LAZY_IMPORTS = {
    ("recbole_ur4rec.apps.flower.client_app", "recbole_ur4rec.apps.flower.node_service"),  # a forwarding ClientApp imports no torch
    ("recbole_ur4rec.apps.flower.worker", "recbole_ur4rec.apps.flower.node_service"),  # ClientApps import the worker module
    ("recbole_ur4rec.apps.flower.worker", "recbole_ur4rec.federated.catalog"),  # ... to send requests (no torch)
    ("recbole_ur4rec.trainer.feddmmr_trainer", "recbole_ur4rec.federated.flower_nodes"),  # flwr only for Flower runs
}


def layer_of(module):
    """Index in LAYERS of a package module (``recbole_ur4rec`` itself, the lazy public names, is above all)."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder to one")


def climbing_imports(graph):
    """``(importer, imported)`` pairs where a module imports from a higher layer."""
    return sorted((module, target) for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module))


def function_level_imports():
    """``(importer, imported module)`` of every plugin import inside a function."""
    modules = package_modules()
    found = set()
    for module, path in modules.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("recbole_ur4rec"):
                        found |= {(module, f"{inner.module}.{a.name}" if f"{inner.module}.{a.name}" in modules else inner.module) for a in inner.names}
                    elif isinstance(inner, ast.Import):
                        found |= {(module, a.name) for a in inner.names if a.name.startswith("recbole_ur4rec")}
    return found


def test_the_layer_check_finds_a_climbing_import():
    graph = {"recbole_ur4rec.data.utils": {"recbole_ur4rec.model.ur4rec", "recbole_ur4rec.common.checks"}}
    assert climbing_imports(graph) == [("recbole_ur4rec.data.utils", "recbole_ur4rec.model.ur4rec")]
    assert climbing_imports({"recbole_ur4rec.apps.partition_dataset": {"recbole_ur4rec.build"}}) == []


def test_no_import_climbs_the_layers():
    graph = package_graph()
    assert all(layer_of(module) >= 0 for module in graph)  # every module sits in a layer
    climbing = climbing_imports(graph)
    assert climbing == [], "imports from a higher layer: " + "; ".join(f"{a} -> {b}" for a, b in climbing)


def test_imports_inside_functions_are_only_the_deliberately_lazy_ones():
    assert function_level_imports() == LAZY_IMPORTS

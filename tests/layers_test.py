"""The package's layers: every import of a tfx module points down, and no modules import each
other in a loop (function-level imports included)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tfx"
# Lower layers first; a module may import its own subpackage and the ones before it. The tool
# subpackages on top import the layers below, never each other.
LAYERS = ("core", "data", "model", "train", "infer", ("compress", "convert", "export", "tpu"), "serve")
DOCUMENTED_UPWARD = set()  # (importer, imported) pairs allowed against LAYERS, with a reason.


def rank(module: str) -> int:
    package = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if package in (layer if isinstance(layer, tuple) else (layer,)))


def imports() -> dict[str, set[str]]:
    """{module: the tfx modules it imports}, read from the source."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("tfx",) + path.relative_to(ROOT).with_suffix("").parts)
        if name.endswith(".__init__") or name.endswith(".__main__") or name.count(".") < 2:
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfx"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                found.update(n if (ROOT.parent / (n.replace(".", "/") + ".py")).exists() else node.module
                             for n in names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("tfx."))
        graph[name] = {m for m in found if m.count(".") >= 2 and m != name}
    return graph


def test_every_module_sits_in_a_layer_subpackage():
    """Outside them stand only the stand-ins that keep the old `python -m tfx.X` paths working."""
    top = [p for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert [p.name for p in top if "moved(__name__" not in p.read_text()] == []
    for module in imports():
        rank(module)


def test_imports_point_down_the_layers():
    upward = {(m, i) for m, found in imports().items() for i in found
              if rank(i) > rank(m) or (rank(i) == rank(m) and m.split(".")[1] != i.split(".")[1])}
    assert upward == DOCUMENTED_UPWARD


def test_no_import_circle():
    graph = imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)

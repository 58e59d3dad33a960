"""The packages of cai are layers, and a module imports only from its own layer or the ones below:
core <- generate <- judge <- rating <- train <- service <- chain <- cli. Lazy imports inside functions count
too: they are still a dependency, only a late one. Modules also import one another in no cycle."""

import ast
from pathlib import Path

import pytest

CAI = Path(__file__).resolve().parents[1] / "cai"
LAYERS = ["core", "schemas", "generate", "judge", "rating", "train", "service", "chain", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(CAI.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(top) if top in LAYERS else -1  # `cai` itself: the package docstring only


def imports(path: Path) -> set[str]:
    """The cai modules `path` imports, resolved to modules (not the names inside them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cai.")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cai" and node.level == 0
        ):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in CAI.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if m != "cai" and layer(m) < 0] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert upward == [], f"{module} (layer {LAYERS[layer(module)]}) imports from a layer above it: {upward}"


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_python_entry_points_the_readme_named_before_the_layers_still_resolve():
    import cai
    from cai.generate import config, pipeline

    assert cai.pipeline is pipeline and cai.config is config

"""The package's layers only point down, and no module imports itself through others.

Layers, lowest first (docs/architecture.md): a module may import its own layer's package and any
layer below it, never one above. Imports inside functions count too: a late import is still a
dependency. ``__main__.py`` files are entry points, not library code, and are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = ["config", "data", "models", "losses", "inference", "ship", "train", "bench", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
# YAML and JSON shipped in the wheel, and standalone scripts for other environments (a vLLM venv)
# that import nothing of leaplm: no library code
DATA_PACKAGES = {"leaplm.configs", "leaplm.launch"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every library module (the repository root is the ``leaplm`` package)."""
    found = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", "build", "dist"} or rel.parts[0].startswith("."):
            continue
        parts = ["leaplm", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The leaplm modules a file imports, resolved to modules (``from leaplm.x import y`` is leaplm.x.y
    when y is a module, else leaplm.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("leaplm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leaplm") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def _layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    return top if top in RANK else ""


def _standalone(module: str) -> bool:
    """A data package, or a script in one that imports nothing of leaplm."""
    inside = any(module == p or module.startswith(p + ".") for p in DATA_PACKAGES)
    return inside and (module in DATA_PACKAGES or not _imports(MODULES[module]))


def test_every_library_module_belongs_to_a_layer():
    stray = [m for m in MODULES if m != "leaplm" and not _standalone(m) and not _layer(m)]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}; add the folder to LAYERS and the docs"


def test_the_check_sees_late_and_aliased_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from leaplm.train import trainer as t\n    import leaplm.ship.export\n"
                      "from leaplm.models.zoo import load_model\n")
    assert _imports(source) == {"leaplm.train.trainer", "leaplm.ship.export", "leaplm.models.zoo"}
    assert RANK[_layer("leaplm.train.trainer")] > RANK[_layer("leaplm.models.heads")]


def test_imports_point_down_the_layers():
    upward = []
    for module, path in MODULES.items():
        if path.name == "__main__.py" or module == "leaplm" or _standalone(module):
            continue
        for imported in _imports(path):
            if imported != "leaplm" and RANK[_layer(imported)] > RANK[_layer(module)]:
                upward.append(f"{module} imports {imported}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()
             if p.name != "__main__.py"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)

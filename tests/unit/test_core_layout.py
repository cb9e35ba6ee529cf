"""core/d2v's shape holds: no import cycles between its modules (counting imports inside
functions too), each folder imports only the folders below it, and core never imports a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
#: what each folder may import besides itself (docs/architecture.md's layers; each __init__ says so)
ALLOWED = {
    "api": set(),
    "nn": {"api"},
    "ssl": {"api"},
    "spec": {"api"},
    "data": {"api", "spec"},
    "interop": {"api", "spec", "train"},  # train: only train.checkpoint, to find a run's newest weights
    "train": {"api", "spec", "data", "nn", "ssl", "interop"},
    "use": {"api", "spec", "data", "interop", "train"},
    "cli": {"api", "spec", "data", "interop", "train", "use"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {n for n in _imports(path) if n in modules and n != name} for name, path in modules.items()}


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_each_folder_imports_only_the_layers_below_it():
    folder = lambda module: module.split(".")[1] if module.count(".") >= 1 else None  # noqa: E731
    wrong = sorted({(m, t) for m, targets in _graph().items() for t in targets
                    if folder(m) in ALLOWED and folder(t) and folder(t) != folder(m)
                    and folder(t) not in ALLOWED[folder(m)]})
    assert wrong == []
    assert set(ALLOWED) == {p.name for p in (CORE / "d2v").iterdir() if (p / "__init__.py").is_file()}


def test_core_never_imports_a_plugin():
    plugins = {p.name for p in (CORE.parent / "plugins").iterdir() if p.is_dir()}
    offenders = sorted((name, imported) for name, path in _modules().items() for imported in _imports(path)
                       if imported.split(".")[0] in plugins)
    assert offenders == []

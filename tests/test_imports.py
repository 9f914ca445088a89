"""The import graph of the library is one way: no cycles, and no module imports from a layer above
its own (lazy imports inside functions count the same: they only hide an edge).

Layers, bottom to top:
  0 shared helpers   errors, fileio, result, stageio, ranks, provenance, schema, tasks
  1 domain           everything else: data.*, methods, objectives.*, training, trainer, merging, ...
  2 workflow side    pipeline, settings, tracking, leaderboard, gpus: what records and schedules stages
  3 stages           stages.<rule>: one module per rule
  4 entry            runner (calls the stages), cli
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tunesmith"

SHARED = {"errors", "fileio", "result", "stageio", "ranks", "provenance", "schema", "tasks"}
WORKFLOW = {"pipeline", "settings", "tracking", "tracking_record", "tracking_run", "tracking_writer",
            "mlflow_store", "leaderboard", "gpus"}
ENTRY = {"runner", "cli"}


def layer(module: str) -> int:
    name = module.removeprefix("tunesmith.")
    if module == "tunesmith" or name in SHARED:
        return 0
    if name in WORKFLOW:
        return 2
    if name.startswith("stages"):
        return 3
    if name in ENTRY:
        return 4
    return 1


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from tunesmith import x` names the module tunesmith.x; `from tunesmith.x import y` a name in it
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("tunesmith"):
                    hit = resolve(target)
                    if hit and hit != name and hit != "tunesmith":
                        found.add(hit)
        edges[name] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
                    for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_the_check_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer("tunesmith.stages.train") > layer("tunesmith.training") > layer("tunesmith.errors")

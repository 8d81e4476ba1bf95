"""The package layers hold: read every eetune import with `ast` (function-local ones too).

- library code (every package and top-level module but `stages` and `cli`) never imports
  `eetune.stages` or `eetune.cli`: commands sit on top of the library, not inside it;
- no module imports a private name (`_x`, or a module `_m`) of another package: what two
  packages share is public;
- the package-level graph has no cycle (a top-level module such as `eetune/rundir.py` is a
  node of its own; imports inside one package are not edges).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import eetune

ROOT = Path(eetune.__file__).resolve().parent
# Entry points: the command line and the stages it calls. Everything else is library.
TOP = {"cli", "__main__", "stages"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. eetune.eval.report
    target: str  # the imported eetune module, e.g. eetune.train.metrics
    names: tuple[str, ...]  # names taken from it (`from target import a, b`); () for `import target`
    line: int

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """The layer a module belongs to: eetune.eval.report -> eval, eetune.rundir -> rundir."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "eetune"


def is_module(module: str) -> bool:
    path = ROOT.parent / Path(*module.split("."))
    return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno) for a in node.names if a.name.split(".")[0] == "eetune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "eetune":
                continue
            names = tuple(a.name for a in node.names)
            # `from eetune.pkg import mod` imports the module eetune.pkg.mod: count it as its own import.
            submodules = [n for n in names if is_module(f"{source}.{n}")]
            rest = tuple(n for n in names if n not in submodules)
            found += [Import(module, f"{source}.{n}", (), node.lineno) for n in submodules]
            if rest or not submodules:
                found.append(Import(module, source, rest, node.lineno))
    return found


def all_imports() -> list[Import]:
    return [imp for path in sorted(ROOT.rglob("*.py")) for imp in imports_of(path)]


def package_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """package -> imported package -> the imports that make the edge."""
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        src, dst = package_of(imp.module), package_of(imp.target)
        if src != dst and dst != "eetune":
            graph[src][dst].append(imp)
    return graph


def cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_violations(imports: list[Import]) -> list[str]:
    return [
        f"{imp.where} imports {imp.target}"
        for imp in imports
        if package_of(imp.module) not in TOP and package_of(imp.target) in {"stages", "cli"}
    ]


def private_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if package_of(imp.module) == package_of(imp.target):
            continue
        private_path = [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
        private_names = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private_path or private_names:
            what = ", ".join(private_names) if private_names else imp.target
            bad.append(f"{imp.where} imports private {what} from {imp.target}")
    return bad


def shortest_cycle(graph: dict[str, dict[str, list[Import]]], start: str, within: set[str]) -> list[str]:
    """The fewest packages from `start` back to itself, staying in `within` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w not in within or w in came_from:
                    continue
                came_from[w] = v
                if w == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(w)
        frontier = following
    return []


def cycle_violations(imports: list[Import]) -> list[str]:
    """One entry per strongly connected set of packages: its shortest cycles, each edge with its imports."""
    graph = package_graph(imports)
    out = []
    for component in cycles(graph):
        seen: set[tuple[str, ...]] = set()
        lines = []
        for start in component:
            cycle = shortest_cycle(graph, start, set(component))
            turn = cycle.index(min(cycle[:-1]))
            key = tuple(cycle[turn:-1] + cycle[:turn])
            if key in seen:
                continue
            seen.add(key)
            lines.append("  " + " -> ".join(cycle))
            for src, dst in zip(cycle, cycle[1:]):
                where = sorted({(i.module, i.line, i.target) for i in graph[src][dst]})
                lines.append(f"    {src} -> {dst}: " + ", ".join(f"{m}:{n} ({t})" for m, n, t in where))
        out.append(f"packages {', '.join(component)} import each other:\n" + "\n".join(lines))
    return out


def test_the_walk_sees_function_local_and_module_imports() -> None:
    imports = all_imports()
    targets = {(imp.module, imp.target) for imp in imports}
    assert ("eetune.__main__", "eetune.cli") in targets
    # cli imports its stages inside the command functions.
    assert any(m == "eetune.cli" and t.startswith("eetune.stages.") for m, t in targets)


def test_library_never_imports_stages_or_cli() -> None:
    bad = layer_violations(all_imports())
    assert not bad, "library modules import the command layer (eetune.stages / eetune.cli):\n" + "\n".join(bad)


def test_no_private_imports_across_packages() -> None:
    bad = private_violations(all_imports())
    assert not bad, "private names imported from another package (make them public, or move them):\n" + "\n".join(bad)


def test_package_graph_has_no_cycle() -> None:
    bad = cycle_violations(all_imports())
    assert not bad, "the package import graph has cycles:\n" + "\n".join(bad)


def test_checks_catch_planted_violations() -> None:
    """Each check fires on a made-up import, so an empty report means something."""
    planted = [
        Import("eetune.eval.report", "eetune.stages.generate", ("run",), 1),
        Import("eetune.rundir", "eetune.cli", ("main",), 2),
        Import("eetune.eval.report", "eetune.train.metrics", ("_start_wandb",), 3),
        Import("eetune.data.chat", "eetune.infer.kv_cache", ("x",), 4),
        Import("eetune.infer.kv_cache", "eetune.data.chat", ("y",), 5),
    ]
    assert len(layer_violations(planted)) == 2
    assert private_violations(planted) == [
        "eetune.eval.report:3 imports private _start_wandb from eetune.train.metrics"
    ]
    (message,) = cycle_violations(planted)
    assert "data -> infer -> data" in message
    assert "eetune.data.chat:4 (eetune.infer.kv_cache)" in message
    assert "eetune.infer.kv_cache:5 (eetune.data.chat)" in message

"""The layer order, checked: domain (`conveyor/` minus `conveyor/cli/` and `conveyor/service/`) -> Prefect layer
(`tasks/`, `flows/`, `conveyor/service/`) -> CLI (`conveyor/cli/`), with no import loop and no arrow back up; no
domain module pulls in `prefect`."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conveyor", "flows", "tasks")
DOMAIN, PREFECT_LAYER, CLI = 0, 1, 2
LAYER_NAMES = {DOMAIN: "domain", PREFECT_LAYER: "tasks/flows", CLI: "cli"}

# Known edges that the storage/backup split (helper `versions`, issue 11) removes: the lead empties this set at
# merge (test_allowlist_lists_only_real_edges fails once an edge is gone). Any other arrow up or loop fails now.
EXPECTED_TO_BE_FIXED: set[tuple[str, str]] = set()  # known edges against the order, each with a reason


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in p.parts:
                out[module_name(p)] = p
    return out


def layer(mod: str) -> int:
    if mod == "conveyor.cli" or mod.startswith("conveyor.cli."):
        return CLI
    if mod.split(".")[0] in ("flows", "tasks") or mod == "conveyor.service" or mod.startswith("conveyor.service."):
        return PREFECT_LAYER  # conveyor/service/: the service beside Prefect (supervisor, server, worker)
    return DOMAIN


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The statements that run when the module is imported: not those inside a function body."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return out


def imports(mod: str, path: Path, known: dict[str, Path], at_import: bool = False) -> set[str]:
    """Project modules that `mod` imports anywhere in its body (function-level imports count too); with
    `at_import`, only those its import runs, each with its parent packages (importing `a.b.c` runs `a/b/__init__`)."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in (_module_level(tree) if at_import else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` is an edge to the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    if at_import:
        out |= {".".join(m.split(".")[:i]) for m in list(out) for i in range(1, m.count(".") + 1)}
    return {m for m in out if m in known and m != mod and not mod.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def without_allowlist(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if (m, d) not in EXPECTED_TO_BE_FIXED} for m, deps in graph.items()}


def test_no_import_loops():
    loops = cycles(without_allowlist(import_graph()))
    assert not loops, "import loops: " + "; ".join(" <-> ".join(c) for c in loops)


def test_no_loop_when_a_module_is_imported_first():
    """What Python runs at import, package `__init__`s included: a loop here is an ImportError for whichever
    module of it a process imports first (backup.snapshot <-> datasets.format through conveyor/backup/__init__
    was one, which the whole-body graph above missed because it ignores parent packages)."""
    known = modules()
    loops = cycles({m: imports(m, p, known, at_import=True) for m, p in known.items()})
    assert not loops, "import-time loops: " + "; ".join(" <-> ".join(c) for c in loops)


def test_no_arrow_back_up():
    up = sorted(f"{m} ({LAYER_NAMES[layer(m)]}) imports {d} ({LAYER_NAMES[layer(d)]})"
                for m, deps in without_allowlist(import_graph()).items() for d in deps if layer(d) > layer(m))
    assert not up, "arrows back up the layer order:\n" + "\n".join(up)


def test_allowlist_lists_only_real_edges():
    """An allowlisted edge that no longer exists is stale: drop it from EXPECTED_TO_BE_FIXED."""
    graph = import_graph()
    assert not [e for e in EXPECTED_TO_BE_FIXED if e[1] not in graph.get(e[0], set())]


_PROBE = """
import importlib, json, sys
watched, out = sys.argv[1], {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    out[name] = watched in sys.modules
print(json.dumps(out))
"""


def _imports_prefect(names: list[str], watched: str = "prefect", path: Path = ROOT) -> dict[str, bool]:
    """For each module imported in turn in one fresh interpreter: is `watched` loaded by then?"""
    r = subprocess.run([sys.executable, "-c", _PROBE, watched, *names], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_domain_never_pulls_in_prefect():
    domain = [m for m in modules() if layer(m) == DOMAIN]
    assert len(domain) > 20  # the walk really found the domain
    together = _imports_prefect(domain)  # one interpreter for all: cheap when the answer is "none"
    if any(together.values()):  # attribute: each module alone, in its own fresh interpreter
        culprits = [m for m in domain if _imports_prefect([m])[m]]
        assert not culprits, f"domain modules that import prefect: {culprits}"
    assert not any(together.values())


def test_checks_can_fail(tmp_path):
    """The walk sees a loop, an arrow up and a prefect import when they are there."""
    graph = {"conveyor.a": {"conveyor.b"}, "conveyor.b": {"conveyor.a"}, "flows.f": {"conveyor.cli"},
             "conveyor.cli": set()}
    assert cycles(graph) == [["conveyor.a", "conveyor.b"]]
    assert layer("flows.f") < layer("conveyor.cli") and layer("conveyor.a") < layer("tasks.t")
    assert layer("conveyor.service.supervisor") == layer("tasks.t") > layer("conveyor.servicex")
    (tmp_path / "culprit.py").write_text("import csv\n")  # stands in for prefect: same check, no 5 s import
    assert _imports_prefect(["json", "culprit"], watched="csv", path=tmp_path) == {"json": False, "culprit": True}

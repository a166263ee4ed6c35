"""The rooms' import rules, checked on the source (every import statement, function-level ones included).

    offload/  <-  mixtral_lite/model/  <-  generation/  <-  runtime/  <-  cli/, serve/  <-  python -m shims

Imports only point left (or stay in the room); no cycles; a front end's command module (cli.generate,
serve.server, ...) is imported by its shim alone, and cli/ and serve/ never import each other.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mixtral_lite", "offload")
SHIMS = {"mixtral_lite.generate", "mixtral_lite.perplexity", "mixtral_lite.chat", "mixtral_lite.server"}
COMMANDS = {"mixtral_lite.cli.generate", "mixtral_lite.cli.perplexity", "mixtral_lite.cli.chat",
            "mixtral_lite.serve.server"}
FRONT_ENDS = ("mixtral_lite.cli", "mixtral_lite.serve")
LAYERS = {"offload": 0, "mixtral_lite": 1, "mixtral_lite.model": 1, "mixtral_lite.generation": 2,
          "mixtral_lite.runtime": 3, "mixtral_lite.cli": 4, "mixtral_lite.serve": 4}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    known = known or modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def room(name: str) -> str:
    """The longest LAYERS key that is `name` or a package above it."""
    return max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in sorted(g.items()):
        for b in sorted(targets):
            if a in SHIMS:
                if b not in COMMANDS:
                    bad.append(f"{a} -> {b}: a shim only calls its command's main")
                continue
            if b in SHIMS or b in COMMANDS:
                bad.append(f"{a} -> {b}: a front end's command is imported by its shim alone")
            elif room(b) in FRONT_ENDS and room(a) != room(b):
                bad.append(f"{a} -> {b}: {room(b)} is a front end; only its own modules import it")
            elif LAYERS[room(b)] > LAYERS[room(a)]:
                bad.append(f"{a} -> {b}: {room(a)} sits below {room(b)}")
    return bad


def test_every_module_imports():
    for name in modules():
        importlib.import_module(name)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_offload_never_imports_mixtral_lite():
    g = graph()
    upward = {m: sorted(t for t in g[m] if t.startswith("mixtral_lite")) for m in g if m.startswith("offload")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_imports_point_down_and_front_ends_stay_apart():
    assert violations(graph()) == []


@pytest.mark.parametrize("edge, rule", [
    (("mixtral_lite.model.transformer", "mixtral_lite.runtime.offloading"), "sits below"),
    (("mixtral_lite.runtime.load", "mixtral_lite.cli.generate"), "imported by its shim alone"),
    (("mixtral_lite.serve.server", "mixtral_lite.cli.front_door"), "is a front end"),
    (("offload.cache", "mixtral_lite.model.config"), "sits below"),
])
def test_the_rules_catch_a_bad_import(edge, rule):
    """The checks themselves: one forbidden arrow added to the real graph is reported."""
    g = graph()
    g[edge[0]].add(edge[1])
    assert any(rule in v for v in violations(g)), edge
    g = graph()
    g["mixtral_lite.model.config"].add("mixtral_lite.model.transformer")  # transformer imports config
    assert cycles(g) == [sorted({"mixtral_lite.model.config", "mixtral_lite.model.transformer"})]

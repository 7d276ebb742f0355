"""The package's import rules, read from the source (every import, module level or inside a function).

Layers, lowest first: common → engine → store → ingest → speech → index → demo → summaries → service → the faces (cli, ui, api; `vidmini serve` in cli/ may start api/).
`summaries` sits under the service: it is the summarizing work, given its question-answering (an asker) and the
service's Library passed in, and the service offers it to every face (CLI, app, the HTTP API to come).
A package imports only packages below it (and itself); the faces import only `vidmini.service` and
`vidmini.common`; there are no import cycles between modules. The installed package never imports `research`.

`KNOWN` lists the imports that still break a rule, each with the reason it is still there; the test fails when
a new one appears AND when a listed one is gone (so the list only shrinks, and says what is left to do).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vidmini"
LAYERS = ["common", "engine", "store", "ingest", "speech", "index", "demo", "summaries", "watch", "service"]
FACES = {"cli", "ui", "api"}
FACE_MAY_IMPORT = {"service", "common"}
# A face that starts another one: `vidmini serve` runs the HTTP face, and with `--app` the Streamlit face beside
# it (it reaches no data through them).
LAUNCHES = {("cli", "api"), ("cli", "ui")}

# (importing package, imported package): why it is still allowed. Remove a line when its import is gone.
KNOWN: dict[tuple[str, str], str] = {
}


def imports() -> dict[str, set[str]]:
    """module name → the vidmini/research modules it imports."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out[module].update(n for n in names if n.split(".")[0] in ("vidmini", "research"))
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "vidmini" and len(parts) > 2 else None


def broken_rules() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in imports().items():
        src = package_of(module)
        for target in targets:
            if target.split(".")[0] == "research":
                found[(src or module, "research")].append(f"{module} -> {target}")
                continue
            dst = package_of(target)
            if src is None or dst is None or dst == src:
                continue
            if src in FACES:
                ok = dst in FACE_MAY_IMPORT or (src, dst) in LAUNCHES
            elif dst in FACES:
                ok = False
            else:
                ok = LAYERS.index(dst) < LAYERS.index(src)
            if not ok:
                found[(src, dst)].append(f"{module} -> {target}")
    return found


def test_every_package_is_placed_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS) | FACES


def test_imports_follow_the_layers():
    found = broken_rules()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "imports that break the layering:\n" + "\n".join(sorted(x for v in new.values() for x in v))
    gone = sorted(set(KNOWN) - set(found))
    assert not gone, f"these no longer happen; remove them from KNOWN: {gone}"


def test_no_import_cycles_between_modules():
    graph = imports()
    modules = set(graph)
    edges = {m: {t for t in graph[m] if t in modules and t != m} for m in modules}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"

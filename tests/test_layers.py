"""The library's layers, derived from its imports: the package graph of src/cmpipe has no cycle
(so every package has a floor), and nothing below the top imports it: cmpipe.pipeline (params and
paths), cmpipe.export and cmpipe.bench are imported by stages, by each other or by nobody. A new
upward arrow fails here with the file and the import. Static (ast), as tests/test_dvc_deps.py."""
from __future__ import annotations

import graphlib

from test_dvc_deps import PACKAGES, imported_names, module_name

TOP = {"pipeline", "export", "bench"}  # may import everything below; nothing below imports them


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "cmpipe" and len(parts) > 1 else None


def library_imports() -> dict[str, set[tuple[str, str]]]:
    """{package: {(imported package, "file -> module")}} of every file under src/cmpipe."""
    root = PACKAGES["cmpipe"]
    edges: dict[str, set[tuple[str, str]]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, PACKAGES)
        mine = package_of(module)
        if mine is None:
            continue
        edges.setdefault(mine, set())
        for name in imported_names(module, path):
            if name.split(".")[0] == "stages":
                edges[mine].add(("stages", f"{path.relative_to(root.parent.parent)} imports {name}"))
            theirs = package_of(name)
            if theirs and theirs != mine and ((root / theirs).is_dir() or (root / f"{theirs}.py").is_file()):
                edges[mine].add((theirs, f"{path.relative_to(root.parent.parent)} imports {name}"))
    return edges


def test_the_package_graph_has_floors():
    edges = library_imports()
    graph = {p: {q for q, _ in e} for p, e in edges.items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        why = [w for p, q in zip(cycle, cycle[1:]) for r, w in edges[p] if r == q]
        raise AssertionError(f"the packages {' -> '.join(cycle)} import each other in a loop:\n" + "\n".join(why)) from None
    floor = {}
    for p in order:  # the ground floor imports nothing of the project; each other one stands above its imports
        floor[p] = 1 + max((floor[q] for q in graph.get(p, ()) if q in floor), default=0)
    assert floor["pipeline"] > max(floor[p] for p in floor if p not in TOP), floor


def test_nothing_below_the_top_imports_it():
    upward = [why for p, e in library_imports().items() for q, why in e
              if q == "stages" or (q in TOP and p not in TOP)]
    assert not upward, "imports that run back up (pass the value from the stage instead):\n" + "\n".join(sorted(upward))

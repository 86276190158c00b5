"""dvc.yaml's deps cannot drift from the code: each stage declares every project file it runs and
every layout artifact path it uses. Static (ast + yaml): imports are followed from the stage's
`python -m` modules, so the test holds whatever the package layout is."""
from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"cmpipe": REPO / "src" / "cmpipe", "stages": REPO / "stages"}  # the project's code
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Resume checkpoints (layout.py: "not DVC outputs", a finished stage removes its own): DVC must not
# track them, so a stage may use paths under this folder without declaring them.
UNTRACKED = Path("data/.resume")


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def module_file(name: str, packages: dict[str, Path]) -> Path | None:
    """`pkg/mod.py` or `pkg/mod/__init__.py` of a project module; None outside the project."""
    top, *rest = name.split(".")
    if top not in packages:
        return None
    base = packages[top].joinpath(*rest)
    for candidate in ([base.with_suffix(".py")] if rest else []) + [base / "__init__.py"]:
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, packages: dict[str, Path]) -> str:
    """The dotted name of a project file (the inverse of module_file)."""
    for top, root in packages.items():
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            return ".".join((top, *parts[:len(parts) - (parts[-1:] == ("__init__",))]))
    raise ValueError(f"{path} is not in the project")


def import_target(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module name of `from <target> import ...`, relative ones included."""
    if not node.level:
        return node.module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import anywhere in the file may load (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = import_target(node, module, path)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # submodules, if any
    return names


def project_files(entries: list[str], packages: dict[str, Path]) -> dict[Path, str]:
    """{file: module} of the entry modules and every project module they import, transitively,
    with the __init__.py of each package imported through."""
    files, todo = {}, list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            path = module_file(prefix, packages)
            if path and path not in files:
                files[path] = prefix
                todo.extend(imported_names(prefix, path))
    return files


def entry_modules(cmd: str | list[str], packages: dict[str, Path]) -> list[str]:
    """The project modules a stage's command names: `python -m a.b c.d` -> [a.b, c.d]."""
    words = [w for line in ([cmd] if isinstance(cmd, str) else cmd) for w in shlex.split(line)]
    after_m = words[words.index("-m") + 1:] if "-m" in words else []
    return [w for w in after_m if w.split(".")[0] in packages]


def layout_constants(path: Path) -> dict[str, Path]:
    """The Path constants of a layout module: `Path("x")`, `NAME / "y"`, `ALIAS = NAME`."""
    consts: dict[str, Path] = {}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return consts.get(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path":
            args = [value(a) for a in node.args]
            return Path(*args) if args and None not in args else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = value(node.left), value(node.right)
            return left / right if isinstance(left, Path) and right is not None else None
        return None

    for node in parse(path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(v := value(node.value), Path):
                consts[node.targets[0].id] = v
    return consts


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def layout_names_used(module: str, path: Path, layout: str) -> set[str]:
    """Names the file takes from the layout module: `from layout import X [as Y]`, `layout.X`."""
    used, aliases = set(), set()
    tree = parse(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name == layout)
        elif isinstance(node, ast.ImportFrom):
            target = import_target(node, module, path)
            for a in node.names:
                if target == layout:
                    used.add(a.name)
                elif f"{target}.{a.name}" == layout:
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and dotted(node.value) in aliases:
            used.add(node.attr)
    return used


def find_layout() -> Path:
    found = sorted(PACKAGES["cmpipe"].rglob("layout.py"))
    assert len(found) == 1, f"expected one layout.py under src/cmpipe, found {found}"
    return found[0]


def covered(path: Path, declared: set[Path]) -> bool:
    return path in declared or any(d in path.parents for d in declared)


def paths_of(stage: dict, *keys: str) -> set[Path]:
    """The paths of a stage's entries under keys (an entry is `path` or `{path: options}`)."""
    return {Path(next(iter(e)) if isinstance(e, dict) else e) for k in keys for e in stage.get(k, [])}


def stage_entries(name: str) -> list[str]:
    entries = entry_modules(STAGES[name].get("cmd", ""), PACKAGES)
    assert entries, f"stage {name!r}: no project module found after `python -m` in its cmd"
    return entries


def stage_files(name: str) -> dict[Path, str]:
    return project_files(stage_entries(name), PACKAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_the_code_the_stage_runs(name):
    deps = paths_of(STAGES[name], "deps")
    misses = [f"stage {name!r}: its cmd runs {m}, but no such module is in the project"
              for m in stage_entries(name) if not module_file(m, PACKAGES)]
    for path, module in sorted(stage_files(name).items()):
        rel = path.relative_to(REPO)
        if not covered(rel, deps):
            misses.append(f"stage {name!r} runs {module} ({rel}) but its deps in dvc.yaml do not cover it: "
                          f"add {rel} (or its folder)")
    if misses:  # all of them in one report, without a traceback
        pytest.fail("\n".join(misses), pytrace=False)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_the_artifacts_it_uses(name):
    layout_path = find_layout()
    layout, consts = module_name(layout_path, PACKAGES), layout_constants(layout_path)
    declared = paths_of(STAGES[name], "deps", "outs", "metrics", "plots")
    used = set().union(*(layout_names_used(m, p, layout) for p, m in stage_files(name).items()))
    misses = [f"stage {name!r} reads {consts[c]} ({c}) but does not declare it in deps"
              for c in sorted(used & consts.keys())
              if not covered(consts[c], declared) and not covered(consts[c], {UNTRACKED})]
    if misses:  # all of them in one report, without a traceback
        pytest.fail("\n".join(misses), pytrace=False)


def test_resolver_on_a_synthetic_tree(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/main.py": "import os\nfrom . import helper\n"
                       "def run():\n    from .sub.deep import f\n    from pkg import lazy\n",
        "pkg/helper.py": "from .paths import OUT as O\n",
        "pkg/lazy.py": "from . import paths\nx = paths.LOG\n",
        "pkg/unused.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..helper import O\nimport numpy\n",
        "pkg/paths.py": "from pathlib import Path\nBASE = Path('data')\nOUT = BASE / 'out'\n"
                        "LOG = Path('reports/log.txt')\nALIAS = OUT\nN = 3\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    packages = {"pkg": tmp_path / "pkg"}

    assert entry_modules("python -m pkg.main extra", packages) == ["pkg.main"]
    assert entry_modules(["python -m other.run pkg.main"], packages) == ["pkg.main"]
    found = project_files(["pkg.main"], packages)
    assert sorted(found.values()) == ["pkg", "pkg.helper", "pkg.lazy", "pkg.main", "pkg.paths", "pkg.sub",
                                      "pkg.sub.deep"]
    assert module_name(tmp_path / "pkg/sub/__init__.py", packages) == "pkg.sub"

    assert layout_constants(tmp_path / "pkg/paths.py") == {
        "BASE": Path("data"), "OUT": Path("data/out"), "LOG": Path("reports/log.txt"), "ALIAS": Path("data/out")}
    used = set().union(*(layout_names_used(m, p, "pkg.paths") for p, m in found.items()))
    assert used == {"OUT", "LOG"}

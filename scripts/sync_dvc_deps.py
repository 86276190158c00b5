"""Rewrite the code entries of every stage's `deps:` in dvc.yaml from the imports of its modules.

    python scripts/sync_dvc_deps.py          # rewrite dvc.yaml in place
    python scripts/sync_dvc_deps.py --check  # exit 1 and print the stages whose deps would change

A stage's code is its `python -m` modules and every project module they import, transitively
(tests/test_dvc_deps.py holds the resolver and fails on a miss). A package folder whose modules are
all run is listed as the folder; otherwise each file is. Data deps (data/..., ${...}) and comments
are kept where they stand.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_dvc_deps import PACKAGES, STAGES, project_files, stage_entries  # noqa: E402

CODE = re.compile(r"^      - (stages/|src/)")


def code_deps(name: str) -> list[str]:
    files = {p.relative_to(REPO) for p in project_files(stage_entries(name), PACKAGES)}
    out = set()
    for f in files:
        folder = f.parent
        top = Path("src/cmpipe")
        if folder != top and folder.parent == top and folder.name != "pipeline":
            # a package of the library: the whole folder when the stage runs all of it
            if all(p.relative_to(REPO) in files for p in (REPO / folder).rglob("*.py")):
                out.add(str(folder))
                continue
        out.add(str(f))
    return sorted(out, key=lambda s: (not s.startswith("stages/"), s))


def main(argv: list[str]) -> int:
    text = (REPO / "dvc.yaml").read_text().split("\n")
    out, stage, in_deps, changed, old = [], None, False, [], None
    for line in text:
        m = re.match(r"^  (\w+):$", line)
        if m and m.group(1) in STAGES:
            stage = m.group(1)
        if line.strip() == "deps:":
            in_deps = True
            out.append(line)
            old = []
            continue
        if in_deps and CODE.match(line):
            old.append(line.strip()[2:])
            continue
        if in_deps and old is not None and not CODE.match(line):
            new = code_deps(stage)
            if new != old:
                changed.append(stage)
            out.extend(f"      - {d}" for d in new)
            in_deps, old = False, None
        out.append(line)
    if "--check" in argv:
        print("\n".join(f"stage {s}: deps differ from the imports" for s in changed) or "dvc.yaml's deps match")
        return 1 if changed else 0
    (REPO / "dvc.yaml").write_text("\n".join(out))
    print(f"rewrote the code deps of {len(changed)} stage(s): {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Write constraints.txt: the exact version of every package ``ragen-archer[test]`` pulls in, as installed here.

``scripts/setup.sh`` (and so ``.ci/run``) installs with ``-c constraints.txt``, so a fresh machine gets the versions
the test suite last passed with.  Upgrading is a deliberate commit: ``pip install -U <pkg>``, run
``bash scripts/test.sh``, then ``python scripts/update_constraints.py`` and commit the file with the test result.

torch is left out: setup installs the pinned CPU build itself, and a GPU user keeps the CUDA torch they have.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {"torch", "ragen-archer"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """Installed name -> version of ``root[extras]`` and everything it requires (markers evaluated here)."""
    found: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (_name(name), wanted) in seen:
            continue
        seen.add((_name(name), wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is required but not installed: run `bash scripts/setup.sh` first")
        found[_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main() -> None:
    pins = closure("ragen-archer", {"test"})
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in LEFT_OUT]
    header = ("# Exact versions the test suite passed with (python scripts/update_constraints.py writes this file;\n"
              "# scripts/setup.sh installs with -c constraints.txt). torch is pinned by setup itself.\n")
    (ROOT / "constraints.txt").write_text(header + "\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} packages")


if __name__ == "__main__":
    main()

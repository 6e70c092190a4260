"""The wheel set of the offline GPU shake-down (tier a): helpers of ``resolve.sh`` and ``pack.sh``.

The target is a linux x86_64 node with CPython 3.12 and a CUDA torch preinstalled, no package index, and at most
64 MiB per carried file.  ``wheels.txt`` (next to this file) lists one wheel a line, as a pip requirement with the
wheel's file name and size in a comment::

    verl==0.9.1  # verl-0.9.1-py3-none-any.whl 1234567

Standard library plus ``packaging`` (which pip's environment has).  Sub-commands:

* ``stub-torch DIR VERSION``: a metadata-only ``torch-VERSION+stub`` wheel, so that pip resolves the set without
  fetching a CUDA torch (its own dependencies, nvidia-* and triton, come with the node's torch);
* ``from-report REPORT``: the ``name==version`` lines of ``pip install --dry-run --report`` less torch, nvidia-*,
  triton;
* ``write-list WHEEL_DIR REQS OUT``: ``wheels.txt`` from the requirement lines, each with the file of ``WHEEL_DIR``
  that a cp312 manylinux (2014 / 2_17 / 2_28) x86_64 pip would pick;
* ``check WHEEL_DIR WHEELS_TXT``: every listed file is in ``WHEEL_DIR`` and carries the listed name and version;
* ``summary WHEELS_TXT``: count, total size, the largest wheels and how many 64 MiB parts each needs.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
import time
import zipfile
from pathlib import Path

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PYTHON = (3, 12)
# the pip flags of common.sh (--platform manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64), as pip
# reads them: manylinux2014 takes manylinux2010 and manylinux1 wheels too (PEP 599)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
             "manylinux1_x86_64"]
PART_BYTES = 64 * 1024 * 1024  # split -b 64M
MIB = 1024 * 1024
# a CUDA torch and what it brings along (its own requirements): never in the set
FROM_TORCH = {"torch", "triton"}
FROM_TORCH_PREFIX = "nvidia-"


def _tag_rank() -> dict[str, int]:
    tags = list(cpython_tags(PYTHON, abis=[f"cp{PYTHON[0]}{PYTHON[1]}"], platforms=PLATFORMS))
    tags += list(compatible_tags(PYTHON, interpreter=f"cp{PYTHON[0]}{PYTHON[1]}", platforms=PLATFORMS))
    return {str(tag): rank for rank, tag in enumerate(tags)}


def stub_torch(folder: str, version: str) -> None:
    name = f"torch-{version}+stub"
    dist_info = f"{name}.dist-info"
    files = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}+stub\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelset.py\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    record = []
    Path(folder).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(Path(folder) / f"{name}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text)}")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n")


def from_report(report: str) -> None:
    data = json.loads(Path(report).read_text())
    kept, dropped = [], []
    for item in data["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        canonical = canonicalize_name(name)
        torch_side = canonical in FROM_TORCH or canonical.startswith(FROM_TORCH_PREFIX)
        (dropped if torch_side else kept).append(f"{name}=={version}")
    print(f"# dropped (they come with the CUDA torch): {' '.join(dropped) or 'none'}", file=sys.stderr)
    for line in sorted(kept, key=str.lower):
        print(line)


def read_requirements(path: str) -> list[tuple[str, str, str, int]]:
    """``(name, version, file, size)`` of each line of a requirements file (file and size from the comment)."""
    rows = []
    for raw in Path(path).read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        parts = comment.split()
        rows.append((name.strip(), version.strip(), parts[0] if parts else "",
                     int(parts[1]) if len(parts) > 1 else 0))
    return rows


def pick(folder: Path, name: str, version: str) -> Path:
    """The file of ``folder`` that pip on the target would install for ``name==version``."""
    rank, best = _tag_rank(), None
    for path in folder.glob("*.whl"):
        try:
            wheel_name, wheel_version, _, tags = parse_wheel_filename(path.name)
        except Exception:
            continue
        if canonicalize_name(wheel_name) != canonicalize_name(name) or wheel_version != Version(version):
            continue
        ranks = [rank[str(tag)] for tag in tags if str(tag) in rank]
        if ranks and (best is None or min(ranks) < best[0]):
            best = (min(ranks), path)
    if best is None:
        raise SystemExit(f"no cp312 manylinux x86_64 wheel of {name}=={version} in {folder}")
    return best[1]


def write_list(folder: str, reqs: str, out: str) -> None:
    rows = []
    for name, version, _, _ in read_requirements(reqs):
        path = pick(Path(folder), name, version)
        rows.append((name, version, path.name, path.stat().st_size))
    total = sum(size for *_, size in rows)
    split = [(file, size) for _, _, file, size in rows if size > PART_BYTES]
    header = [
        "# The wheels an offline GPU node needs beyond its CUDA torch to run the veRL plugin (tier a shake-down):",
        "# CPython 3.12, manylinux (2014 / 2_17 / 2_28) x86_64. torch, triton and nvidia-* are left out: they come",
        "# with the node's torch. Written by scripts/gpu_shakedown/resolve.sh (pip install --dry-run --report with a",
        "# stub torch, constraints.txt's pins); pack.sh downloads and splits them, run_offline.sh installs them with",
        "#   pip install --no-index --find-links wheels --no-deps -r wheels.txt",
        f"# {len(rows)} wheels, {total / MIB:.1f} MiB; over 64 MiB (split into 64 MiB parts): "
        + (", ".join(f"{file} ({math.ceil(size / PART_BYTES)} parts)" for file, size in split) or "none"),
        f"# resolved {time.strftime('%Y-%m-%d')}; line format: name==version  # file bytes",
    ]
    body = [f"{name}=={version}  # {file} {size}" for name, version, file, size in rows]
    Path(out).write_text("\n".join(header + body) + "\n")
    summary(out)


def check(folder: str, wheels_txt: str) -> None:
    missing = []
    for name, version, file, _ in read_requirements(wheels_txt):
        path = Path(folder) / file
        if not path.is_file():
            missing.append(file)
            continue
        wheel_name, wheel_version, _, _ = parse_wheel_filename(file)
        if canonicalize_name(wheel_name) != canonicalize_name(name) or wheel_version != Version(version):
            raise SystemExit(f"{file} is not {name}=={version}")
    if missing:
        raise SystemExit(f"missing from {folder}: {' '.join(missing)}")


def summary(wheels_txt: str, top: int = 6) -> None:
    rows = read_requirements(wheels_txt)
    total = sum(size for *_, size in rows)
    print(f"{len(rows)} wheels, {total / MIB:.1f} MiB in all; the largest:")
    for name, version, file, size in sorted(rows, key=lambda r: -r[3])[:top]:
        parts = math.ceil(size / PART_BYTES)
        note = f"{parts} parts of <= 64 MiB" if size > PART_BYTES else "1 file"
        print(f"  {name}=={version}  {size / MIB:.1f} MiB  ({note})  {file}")


def main(argv: list[str]) -> None:
    commands = {"stub-torch": stub_torch, "from-report": from_report, "write-list": write_list, "check": check,
                "summary": summary}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: wheelset.py {{{','.join(commands)}}} ARGS (see the docstring)")
    commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])

"""``config/base.yaml`` rendered from the schema in :mod:`ragen.config`: one source for every key's default and meaning.

    python -m ragen.config_yaml            # rewrite config/base.yaml from the schema
    python -m ragen.config_yaml --check    # exit 1 (with a diff) when the file is not what the schema renders

Each key is written with its default and its ``doc`` as a comment; ``tests/test_config.py`` fails when the file and
the schema differ, so a default is changed in the schema (then this command), never in the yaml alone.
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
import textwrap
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ragen.config import RunConfig

BASE_YAML = Path(__file__).resolve().parent.parent / "config" / "base.yaml"
COMMENT_COLUMN = 34
WIDTH = 120
HEADER = """\
# Every key of a run, with its default and meaning. GENERATED from the schema (ragen/config.py) by
# `python -m ragen.config_yaml`: change a default there, then run that command (tests/test_config.py checks it).
# `python train.py` runs this file; the presets extend it (`python train.py --config-name archer`); any key can be
# set on the command line (`python train.py archer.alpha=0.5`).
"""


def render_scalar(value: Any) -> str:
    """A scalar or a flat list as YAML that OmegaConf reads back as the same value (``1.0e-05``, not ``1e-05``,
    which YAML 1.1 reads as a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a schema default must be finite; got {value!r}")
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            mantissa += "" if "." in mantissa else ".0"
            text = f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_scalar(v) for v in value) + "]"
    if isinstance(value, str):
        try:
            plain = value and not value.startswith(("[", "{")) and yaml.safe_load(f"k: {value}") == {"k": value}
        except yaml.YAMLError:  # '||' starts a block scalar
            plain = False
        return value if plain else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot render a default of type {type(value).__name__}: {value!r}")


def _with_comment(line: str, doc: str) -> list[str]:
    """``line`` with ``doc`` wrapped into comments at :data:`COMMENT_COLUMN` (or two spaces after a long key)."""
    if not doc:
        return [line]
    if len(line) + 2 > COMMENT_COLUMN + 12:  # a long default: the comment goes above the key
        indent = " " * (len(line) - len(line.lstrip()))
        chunks = textwrap.wrap(doc, width=WIDTH - len(indent) - 2, break_on_hyphens=False)
        return [f"{indent}# {chunk}" for chunk in chunks] + [line]
    column = max(COMMENT_COLUMN, len(line) + 2)
    chunks = textwrap.wrap(doc, width=WIDTH - column - 2, break_on_hyphens=False)
    return [line.ljust(column) + "# " + chunks[0]] + [" " * column + "# " + chunk for chunk in chunks[1:]]


def _render_node(node: Any, indent: int, with_docs: bool = True) -> list[str]:
    """The fields of a dataclass, or the items of a mapping, as YAML lines at ``indent`` spaces.  In a mapping of
    sections (``custom_envs``) only the first item carries the field docs."""
    pad = " " * indent
    lines: list[str] = []
    if is_dataclass(node):
        items = [(f.name, getattr(node, f.name), f.metadata.get("doc", "") if with_docs else "") for f in fields(node)]
    else:
        items = [(name, value, "") for name, value in node.items()]
    for i, (name, value, doc) in enumerate(items):
        if is_dataclass(value) or (isinstance(value, dict) and value):
            if indent == 0 and lines:
                lines.append("")
            lines += _with_comment(f"{pad}{name}:", doc)
            lines += _render_node(value, indent + 2, with_docs and (is_dataclass(node) or i == 0))
        else:
            text = "{}" if isinstance(value, dict) else render_scalar(value)
            lines += _with_comment(f"{pad}{name}: {text}", doc)
    return lines


def render_base_yaml() -> str:
    """The text of ``config/base.yaml``: the schema's defaults and docs."""
    return HEADER + "\n" + "\n".join(_render_node(RunConfig(), 0)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragen.config_yaml", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--path", type=Path, default=BASE_YAML, help="the file (default: config/base.yaml)")
    args = parser.parse_args(argv)
    text = render_base_yaml()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current == text:
            print(f"{args.path}: matches the schema")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   str(args.path), "rendered from ragen/config.py"))
        print(f"\n{args.path} differs from the schema: run `python -m ragen.config_yaml`")
        return 1
    args.path.write_text(text)
    print(f"wrote {args.path} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

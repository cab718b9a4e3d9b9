"""The README's table of supported ops, generated from the op database.

    python tests/opdb/table.py           # print the table
    python tests/opdb/table.py --write   # rewrite README.md's section between the markers

``tests/test_readme_ops.py`` checks that README.md holds exactly this table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

START = "<!-- ops:start -->"
END = "<!-- ops:end -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def _aten_name(op) -> str:
    """``aten.div.Tensor_mode`` -> ``div.Tensor_mode``; ``aten.tanh.default`` -> ``tanh``."""
    return str(op).removeprefix("aten.").removesuffix(".default")


def markdown_table(ops: Iterable) -> str:
    """One row per database entry (``OpInfo``), sorted by family and name."""
    lines = [
        "| op | family | highest order tested | ATen ops with rules it exercises |",
        "|---|---|---|---|",
    ]
    for info in sorted(ops, key=lambda i: (i.family, i.name)):
        aten = ", ".join(f"`{name}`" for name in sorted({_aten_name(op) for op in info.aten}))
        lines.append(f"| `{info.name}` | {info.family} | {info.max_order} | {aten} |")
    return "\n".join(lines)


def section(readme: str) -> str | None:
    """The text between the markers (stripped), or None when they are missing."""
    if START not in readme or END not in readme:
        return None
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def with_table(readme: str, table: str) -> str:
    """``readme`` with the marked section replaced by ``table`` (appended if unmarked)."""
    block = f"{START}\n{table}\n{END}"
    if section(readme) is None:
        return f"{readme.rstrip()}\n\n## Supported ops\n\n{block}\n".lstrip()
    head, rest = readme.split(START, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from opdb import OPS

    table = markdown_table(OPS)
    if "--write" in argv:
        readme = README.read_text() if README.exists() else ""
        README.write_text(with_table(readme, table))
    else:
        print(table)


if __name__ == "__main__":
    main(sys.argv[1:])

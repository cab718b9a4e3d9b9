"""The table of supported ops, generated from the op database.

    python tests/opdb/table.py     # print the table

``docs/generate.py --write`` writes it into ``docs/operators.md`` (between the ``ops``
markers), and ``tests/test_docs.py`` checks that the page holds exactly this table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path


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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from opdb import OPS

    print(markdown_table(OPS))

"""README.md's table of supported ops is the one the op database generates."""

from __future__ import annotations

from opdb import OPS
from opdb.table import README, markdown_table, section, with_table


def test_readme_lists_the_op_database():
    current = section(README.read_text()) if README.exists() else None
    assert current == markdown_table(OPS), (
        "README.md's supported-ops table is stale; regenerate it with "
        "`python tests/opdb/table.py --write`"
    )


def test_writing_replaces_only_the_marked_section():
    readme = "# hod\n\n<!-- ops:start -->\nold\n<!-- ops:end -->\n\nMore text.\n"
    assert with_table(readme, "new") == (
        "# hod\n\n<!-- ops:start -->\nnew\n<!-- ops:end -->\n\nMore text.\n"
    )
    assert section(with_table("# hod\n", "new")) == "new"

"""A griffe extension for the API pages: Sphinx roles in hod's docstrings as code.

hod's docstrings name other objects the Sphinx way (``:class:`~hod.TracingError```,
``:func:`~hod._memory.unwatched```); Markdown shows those roles literally. This turns each
into a code span of the name (its last component when written with ``~``).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")


def as_code(text: str) -> str:
    """``:class:`~hod.X``` -> ```X```; ``:mod:`hod._split``` -> ```hod._split```."""
    return ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class SphinxRolesAsCode(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = as_code(obj.docstring.value)

"""Registration of hod's own decompositions (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._op_table import registrar

HOD_DECOMPOSITIONS: dict[Any, Callable] = {}

#: ``@register_decomposition(*ops)``: trace every op in ``ops`` as the decorated function.
register_decomposition = registrar(HOD_DECOMPOSITIONS, "decompositions")

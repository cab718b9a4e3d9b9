"""Trace stage: the decomposition table, PyTorch's core ATen decompositions plus hod's own.

hod's own decompositions rewrite ops that have no rule into ops that have one (for
instance ``native_layer_norm`` into mean, var and rsqrt). Each family module registers
into :data:`HOD_DECOMPOSITIONS` with :func:`register_decomposition`.
"""

from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions

from . import elementwise, indexing, linalg, nn  # noqa: F401 - importing a family fills the table
from ._registry import HOD_DECOMPOSITIONS, register_decomposition

__all__ = ["DECOMPOSITIONS", "HOD_DECOMPOSITIONS", "KEPT_WHOLE", "register_decomposition"]

aten = torch.ops.aten


#: Core-decomposed ops hod keeps whole: it has rules for them, and one fused op in the
#: generated code is cheaper than its decomposition (relu's backward is one call instead
#: of a comparison and a select). ``eye`` is a constant (no rule needed); its
#: decomposition builds an ``arange`` of ``uint16``, which eager CPU code cannot run
#: (met when hod traces hod's own generated code, which seeds with ``eye``).
KEPT_WHOLE = (aten.threshold_backward.default, aten.eye.default, aten.eye.m)


def _table() -> dict:
    table = dict(core_aten_decompositions())
    for op in KEPT_WHOLE:
        table.pop(op, None)
    table.update(HOD_DECOMPOSITIONS)
    return table


#: The table ``make_fx`` traces with.
DECOMPOSITIONS = _table()

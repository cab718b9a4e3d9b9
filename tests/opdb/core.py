"""Entries for the ops hod's core was built with (MLP and gradient-graph ops)."""

from __future__ import annotations

import torch

from . import OpInfo, add, rand

aten = torch.ops.aten

add(
    OpInfo(
        "matmul_2d", lambda a, b: a @ b, lambda: [(rand(3, 4), rand(4, 2))],
        aten=(aten.mm.default,), argnums=(0, 1), family="linalg", degree=2
    ),
    OpInfo(
        "softmax", lambda x: torch.softmax(x, dim=1), lambda: [(rand(3, 4),)],
        aten=(aten._softmax.default,), family="nn",
    ),
)

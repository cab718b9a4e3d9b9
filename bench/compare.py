"""Derivative results as flat block maps, and their comparison with the reference.

Every engine's result is turned into a :data:`Blocks` map from an index tuple
``(i1, ..., in)`` (positions in ``argnums``, outermost nesting level first) to the tensor
``d^n f / dx_i1 ... dx_in`` of shape ``x_i1.shape + ... + x_in.shape`` (the output is a scalar).
That is the layout of torch.func's nested ``jacfwd(...jacrev(f, argnums)...)`` result, which hod
reproduces; thoad's blocks, fetched one by one, are put in the same map.

Reference and tolerance: the reference is torch.func (jacrev inside n-1 jacfwd) evaluated in
float64 on the same inputs cast to float64, while the engines run in float32. A block passes
when ``max|got - ref| <= RTOL * max|ref| + ATOL``. ATOL is absolute rather than relative because
the seed's relu/softmax MLP has identically zero derivatives (its output is the batch size), so a
float32 engine can only be asked to return float32 round-off there; the tanh MLP rows are where
the relative part does the checking. See :data:`RTOL` and :data:`ATOL`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

Blocks = dict[tuple[int, ...], Tensor]

RTOL = 1e-3
ATOL = 1e-3


class StructureError(ValueError):
    """An engine's result does not have the nesting or shapes of the reference."""


def flatten_nested(result: object, order: int, argnums: int | tuple[int, ...]) -> Blocks:
    """Flatten a torch.func-style result into :data:`Blocks`.

    With an integer ``argnums`` the result is a single tensor; with a tuple it is ``order``
    levels of tuples, each of length ``len(argnums)``.
    """
    if isinstance(argnums, int):
        if not isinstance(result, Tensor):
            raise StructureError(f"expected a tensor, got {type(result).__name__}")
        return {(0,) * order: result}
    n = len(argnums)
    blocks: Blocks = {}
    for index in itertools.product(range(n), repeat=order):
        node = result
        for depth, i in enumerate(index):
            if not isinstance(node, tuple | list) or len(node) != n:
                raise StructureError(
                    f"level {depth}: expected a tuple of {n}, got {_describe(node)}"
                )
            node = node[i]
        if not isinstance(node, Tensor):
            raise StructureError(f"block {index}: expected a tensor, got {_describe(node)}")
        blocks[index] = node
    return blocks


def _describe(node: object) -> str:
    if isinstance(node, tuple | list):
        return f"{type(node).__name__} of {len(node)}"
    return type(node).__name__


@dataclass
class Check:
    """Outcome of comparing one engine's blocks with the reference."""

    ok: bool
    max_abs_err: float
    ref_scale: float
    compared: int
    total: int
    note: str = ""

    def summary(self) -> str:
        """One line for logs and the result file."""
        verdict = "ok" if self.ok else "WRONG"
        text = (
            f"{verdict}: {self.compared}/{self.total} blocks compared, "
            f"max|err| {self.max_abs_err:.2e} (max|ref| {self.ref_scale:.2e})"
        )
        return f"{text}; {self.note}" if self.note else text


def compare_blocks(got: Blocks, ref: Blocks, *, reshape: bool = False) -> Check:
    """Compare ``got`` with ``ref`` block by block.

    With ``reshape`` a block whose shape differs but whose number of elements matches is
    reshaped to the reference shape first (thoad prepends a size-1 output axis). Missing
    blocks, shape mismatches and non-finite values make the check fail.
    """
    problems: list[str] = []
    worst = 0.0
    scale = max((float(r.abs().max()) for r in ref.values() if r.numel()), default=0.0)
    tol = RTOL * scale + ATOL
    compared = 0
    for index, r in ref.items():
        g = got.get(index)
        if g is None:
            problems.append(f"block {index} missing")
            continue
        if g.shape != r.shape:
            if reshape and g.numel() == r.numel():
                g = g.reshape(r.shape)
            else:
                problems.append(f"block {index} shape {tuple(g.shape)} != {tuple(r.shape)}")
                continue
        g = g.detach().to(device=r.device, dtype=r.dtype)
        if not bool(torch.isfinite(g).all()):
            problems.append(f"block {index} has non-finite values")
            continue
        compared += 1
        if r.numel():
            worst = max(worst, float((g - r).abs().max()))
    ok = not problems and worst <= tol
    note = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return Check(ok, worst, scale, compared, len(ref), note)

"""Derivative results as flat block maps, and their comparison with the reference.

Every engine's result is turned into a :data:`Blocks` map from an index tuple
``(i1, ..., in)`` (positions in ``argnums``, outermost nesting level first) to the tensor
``d^n f / dx_i1 ... dx_in`` of shape ``x_i1.shape + ... + x_in.shape`` (the output is a scalar).
That is the layout of torch.func's nested ``jacfwd(...jacrev(f, argnums)...)`` result, which hod
reproduces; thoad's blocks, fetched one by one, are put in the same map.

A result passes when every block is present with the reference's shape (or, for thoad, the same
number of elements), is finite, and ``max|got - ref| <= RTOL * max|ref| + floor`` over all
blocks; the reference and the absolute ``floor`` come from :mod:`bench.reference`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

Blocks = dict[tuple[int, ...], Tensor]

RTOL = 1e-3


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
    tolerance: float
    compared: int
    total: int
    note: str = ""

    def summary(self) -> str:
        """One line for logs and the result file."""
        verdict = "ok" if self.ok else "WRONG"
        relation = "<=" if self.max_abs_err <= self.tolerance else ">"
        text = (
            f"{verdict}: {self.compared}/{self.total} blocks compared, max|err| "
            f"{self.max_abs_err:.2e} {relation} tol {self.tolerance:.1e}, "
            f"max|ref| {self.ref_scale:.2e}"
        )
        return f"{text}; {self.note}" if self.note else text


def max_abs_diff(got: Blocks, ref: Blocks) -> float:
    """Largest absolute difference over blocks present in both with equal shapes."""
    diffs = [
        float((got[k].to(r.dtype) - r).abs().max())
        for k, r in ref.items()
        if k in got and got[k].shape == r.shape and r.numel()
    ]
    return max(diffs, default=0.0)


def compare_blocks(
    got: Blocks, ref: Blocks, *, floor: float, reshape: bool = False
) -> Check:
    """Compare ``got`` with ``ref`` block by block (tolerance in the module docstring).

    With ``reshape`` a block whose shape differs but whose number of elements matches is
    reshaped to the reference shape first (thoad prepends a size-1 output axis). Missing
    blocks, shape mismatches and non-finite values make the check fail.
    """
    problems: list[str] = []
    worst = 0.0
    scale = max((float(r.abs().max()) for r in ref.values() if r.numel()), default=0.0)
    tol = RTOL * scale + floor
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
    return Check(ok, worst, scale, tol, compared, len(ref), note)

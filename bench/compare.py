"""Derivative results as flat block maps, and their comparison with the reference.

Every engine's result is turned into a :data:`Blocks` map from an index tuple
``(i1, ..., in)`` (positions in ``argnums``, outermost nesting level first) to the tensor
``d^n f / dx_i1 ... dx_in`` of shape ``x_i1.shape + ... + x_in.shape`` (the output is a scalar).
That is the layout of torch.func's nested ``jacfwd(...jacrev(f, argnums)...)`` result, which hod
reproduces; thoad's blocks, fetched one by one, are put in the same map by its worker.

The check (:func:`compare_blocks`) is per block and relative. A result passes when every block
of the reference is present with the reference's shape, is finite, and for every block ``b``

    max|got_b - ref_b| <= RTOL * max|ref_b| + ATOL * max_b' max|ref_b'|

``RTOL`` (2e-4) is the error allowed relative to the block's own largest entry; the absolute term
(``ATOL`` = 1e-6 of the largest entry of the whole derivative) only matters for a block much
smaller than the others. The engines compute in float32 and the reference in float64; the
largest relative error an honest float32 engine was measured at on the benchmark rows is in
bench/README.md. An error of 1% in any block fails: 1e-2 > 2e-4 + 1e-6.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

Blocks = dict[tuple[int, ...], Tensor]

#: Allowed error relative to a block's largest reference entry (float32 engines).
RTOL = 2e-4
#: Allowed absolute error, as a fraction of the largest reference entry over all blocks.
ATOL = 1e-6


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
    """Outcome of comparing one engine's blocks with the reference.

    ``max_rel_err`` is the largest over the compared blocks of ``max|got - ref| / max|ref|`` (the
    block's own largest reference entry); ``worst`` names that block.
    """

    ok: bool
    max_rel_err: float
    worst: tuple[int, ...] | None
    compared: int
    total: int
    note: str = ""

    def summary(self) -> str:
        """One line for logs and the result file."""
        verdict = "ok" if self.ok else "WRONG"
        text = (
            f"{verdict}: {self.compared}/{self.total} blocks compared, max relative error "
            f"{self.max_rel_err:.1e} (block {self.worst}; rtol {RTOL:g})"
        )
        return f"{text}; {self.note}" if self.note else text


def reference_scale(ref: Blocks) -> float:
    """The largest magnitude over all reference blocks."""
    return max((float(r.abs().max()) for r in ref.values() if r.numel()), default=0.0)


def block_error(got: Tensor, ref: Tensor, atol: float) -> tuple[float, bool]:
    """Relative error of one block (``max|got - ref| / max|ref|``) and whether it is within
    ``RTOL * max|ref| + atol``; both tensors have the same shape, ``got`` already in ref's dtype."""
    if not ref.numel():
        return 0.0, True
    err = float((got - ref).abs().max())
    size = float(ref.abs().max())
    rel = err / size if size > 0 else (0.0 if err == 0 else float("inf"))
    return rel, err <= RTOL * size + atol


def compare_blocks(got: Blocks, ref: Blocks) -> Check:
    """Compare ``got`` with ``ref`` block by block (the tolerance is in the module docstring).

    Missing blocks, shape mismatches, non-finite values and blocks out of tolerance fail.
    """
    problems: list[str] = []
    atol = ATOL * reference_scale(ref)
    worst_rel, worst = 0.0, None
    compared = 0
    for index, r in ref.items():
        g = got.get(index)
        if g is None:
            problems.append(f"block {index} missing")
            continue
        if g.shape != r.shape:
            problems.append(f"block {index} shape {tuple(g.shape)} != {tuple(r.shape)}")
            continue
        if not bool(torch.isfinite(g).all()):
            problems.append(f"block {index} has non-finite values")
            continue
        compared += 1
        rel, within = block_error(g.detach().to(device=r.device, dtype=r.dtype), r, atol)
        if rel >= worst_rel:
            worst_rel, worst = rel, index
        if not within:
            problems.append(f"block {index} relative error {rel:.1e}")
    note = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return Check(not problems, worst_rel, worst, compared, len(ref), note)

"""The reference result of a row.

Reference: torch.func (``jacrev`` inside ``order - 1`` ``jacfwd``) evaluated in float64 on the
row's inputs cast to float64. The engines' float32 results are compared with it by
:func:`bench.compare.compare_blocks`.

A reference that cannot be used leaves the row ``unchecked``: when torch.func fails, when the
whole derivative is round-off (its largest entry below ``ZERO`` times ``max(1, |f|)``: the seed's
constant read-out gives entries of about 1e-17), or when a block's largest entry is below
``DEGENERATE`` times the largest entry of the whole derivative (a block that is zero or nearly so
could not show a 1% error).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bench.compare import Blocks, flatten_nested, reference_scale
from bench.engines import torch_func_derivative
from bench.models import Case

#: A block smaller than this fraction of the largest one makes the reference degenerate.
DEGENERATE = 1e-6
#: A derivative whose largest entry is below this times max(1, |f|) is taken for zero.
ZERO = 1e-9


class DegenerateReference(ValueError):
    """The reference has a block that is zero, or too small to show a relative error."""


@dataclass
class Reference:
    """Reference blocks of a row, and the spread of their sizes."""

    blocks: Blocks
    scale: float
    smallest_block: float

    def describe(self) -> str:
        return (
            f"torch.func float64; max|ref| {self.scale:.1e}, smallest "
            f"block max {self.smallest_block:.1e}"
        )


def reference(case: Case, inputs: tuple[Tensor, ...]) -> Reference:
    """The float64 reference of ``case`` on ``inputs`` (cast to float64).

    Raises :class:`DegenerateReference` when a block is zero or too small (module docstring).
    """
    forward = case.forward(inputs[0].device)
    fn = torch_func_derivative(forward, case.order, case.argnums)
    inputs64 = tuple(t.double() for t in inputs)
    blocks = flatten_nested(fn(*inputs64), case.order, case.argnums)
    scale = reference_scale(blocks)
    value = abs(float(forward(*inputs64)))
    if not scale > ZERO * max(1.0, value):
        raise DegenerateReference(
            f"the derivative is round-off: max|ref| {scale:.1e} for |f| {value:.1e}"
        )
    sizes = {index: float(b.abs().max()) for index, b in blocks.items() if b.numel()}
    index, smallest = min(sizes.items(), key=lambda item: item[1])
    if smallest < DEGENERATE * scale:
        raise DegenerateReference(
            f"block {index} has max|ref| {smallest:.1e} against {scale:.1e} over all blocks"
        )
    return Reference(blocks, scale, smallest)

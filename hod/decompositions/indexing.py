"""hod decompositions: the backward of reading a slice, as zero padding.

``select_backward`` and ``slice_backward`` (unit step) put a gradient into a zero tensor
at the entries the forward read. torch's core table builds that with ``select_scatter`` /
``slice_scatter``, which decompose into a comparison with an ``arange`` and a ``where`` over
an expanded copy of the gradient. Zero padding says the same in one op that has a rule,
and the planned code adds a padded gradient into a sum in place (see
:mod:`hod.passes.concat`): a function reading ``y[:, 0]``, ``y[:, 1]``, ... of one ``y``
sums four pads instead of four ``where`` over ``(.., 4)`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._decomp import decomposition_table

from ._registry import register_decomposition

aten = torch.ops.aten


def _padding(rank: int, dim: int, before: int, after: int) -> list[int]:
    """``constant_pad_nd``'s pad list (last dim first) that widens ``dim`` alone."""
    pad = [0, 0] * (rank - 1 - dim)
    return pad + [before, after]


@register_decomposition(aten.select_backward.default)
def _select_backward(grad: torch.Tensor, input_sizes: Sequence[int], dim: int, index: int):
    rank = len(input_sizes)
    dim, size = dim % rank, input_sizes[dim % rank]
    index %= size
    return aten.constant_pad_nd.default(
        grad.unsqueeze(dim), _padding(rank, dim, index, size - index - 1), 0.0
    )


def slice_bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """``slice``'s bounds along a dim of ``size`` as ATen resolves them: None is the dim's
    start or end, a negative bound counts from the end, then both are clamped to
    ``[0, size]`` and the end to at least the start."""
    start = 0 if start is None else start + size if start < 0 else start
    end = size if end is None else end + size if end < 0 else end
    start = min(max(start, 0), size)
    return start, min(max(end, start), size)


@register_decomposition(aten.slice_backward.default)
def _slice_backward(grad: torch.Tensor, input_sizes: Sequence[int], dim: int, start: int,
                    end: int, step: int):
    if step != 1:  # torch's own: a slice_scatter into zeros
        return decomposition_table[aten.slice_backward.default](
            grad, input_sizes, dim, start, end, step)
    rank = len(input_sizes)
    dim, size = dim % rank, input_sizes[dim % rank]
    start, end = slice_bounds(start, end, size)
    return aten.constant_pad_nd.default(grad, _padding(rank, dim, start, size - end), 0.0)

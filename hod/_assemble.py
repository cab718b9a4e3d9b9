"""Stage 4: turn seed-space derivative tensors into the blocks torch.func returns.

A derivative of order ``n`` of output leaf ``y`` with respect to the differentiated input
leaves ``(l1, ..., ln)`` is one *block* of shape ``y.shape + x_l1.shape + ... + x_ln.shape``.
Blocks are nested as ``jacfwd(... jacrev(f, argnums) ..., argnums)`` nests them: the
output pytree, then per level the argnums tuple (when argnums is a tuple) and the pytree
of that argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._emitter import Emitter, Operand


@dataclass(frozen=True)
class BlockKey:
    """Output leaf ``out`` differentiated w.r.t. input leaves ``leaves`` (in order)."""

    out: int
    leaves: tuple[int, ...]


@dataclass(frozen=True)
class ArgLayout:
    """How one differentiated positional argument flattens: its spec and leaf indices."""

    spec: TreeSpec
    leaves: tuple[int, ...]


def block_structure(
    out_spec: TreeSpec, n_out: int, argnums: int | tuple[int, ...],
    layouts: dict[int, ArgLayout], order: int,
) -> tuple[list[BlockKey], TreeSpec]:
    """The blocks of an order-``order`` derivative, flat, and the spec that nests them."""

    def nest(level: int, out: int, chain: tuple[int, ...]):
        if level == order:
            return BlockKey(out, chain)

        def per_arg(a: int):
            layout = layouts[a]
            inner = [nest(level + 1, out, chain + (leaf,)) for leaf in layout.leaves]
            return tree_unflatten(inner, layout.spec)

        if isinstance(argnums, tuple):
            return tuple(per_arg(a) for a in argnums)
        return per_arg(argnums)

    tree = tree_unflatten([nest(0, i, ()) for i in range(n_out)], out_spec)
    keys, spec = tree_flatten(tree)
    return keys, spec


@dataclass(frozen=True)
class Segment:
    """Where a differentiated input leaf sits in the seed space."""

    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(torch.Size(self.shape).numel())


def extract_block(
    em: Emitter,
    t: Operand,
    seed_leaves: Sequence[Segment],
    full_seed: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> fx.Node:
    """One block from ``t`` = ``(S,) * j + value_dims`` (``None``: a zero block).

    Seed axis ``i`` is narrowed to ``seed_leaves[i]``, then the seed axes move behind the
    value dims and the result is reshaped to ``shape`` (a contiguous tensor).
    """
    if t is None:
        return em.zeros(shape, dtype)
    j = len(seed_leaves)
    for axis, segment in enumerate(seed_leaves):
        if segment.size != full_seed:
            t = em.call(
                torch.ops.aten.slice.Tensor, t, axis, segment.offset,
                segment.offset + segment.size,
            )
    value_rank = em.rank(t) - j
    t = em.permute(t, list(range(j, j + value_rank)) + list(range(j)))
    return em.contiguous(em.reshape(t, shape))

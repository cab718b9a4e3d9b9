"""Stage 4: turn seed-space derivative tensors into the blocks torch.func returns.

A derivative of order ``n`` of output leaf ``y`` with respect to the differentiated input
leaves ``(l1, ..., ln)`` is one *block* of shape ``y.shape + x_l1.shape + ... + x_ln.shape``.
Blocks are nested as ``jacfwd(... jacrev(f, argnums) ..., argnums)`` nests them: the
output pytree, then per level the argnums tuple (when argnums is a tuple) and the pytree
of that argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._emitter import Emitter, Operand
from ._records import ArgLayout, BlockKey, Segment


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


def extract_block(
    em: Emitter,
    t: Operand,
    span: tuple[int, int],
    value_groups: Sequence[Sequence[int]],
    value_batch_dim: int | None,
    seeds: Sequence[Segment],
    group_order: Sequence[int],
    shape: Sequence[int],
    dtype: torch.dtype,
) -> fx.Node:
    """One dense block from ``t`` = ``(W,) * j + value dims`` (``None``: a zero block),
    whose seed axes cover the seeds ``span = [lo, lo + W)``.

    Seed axis ``i`` is narrowed to ``seeds[i]`` and unflattened to that leaf's shape,
    behind the value dims. Compressed seeds then get their batch dim back: the block is
    nonzero only where it equals the value's batch dim ``value_batch_dim`` (see
    :func:`_spread_batch`). The value dims are split into
    ``value_groups``; ``group_order`` lists the groups (value groups first, then one per
    seed axis) in the order of the result's dims, which is then reshaped to ``shape``.
    Like torch.func's, the block may be a non-contiguous view; it has type ``dtype``.
    """
    compressed = [s for s in seeds if s.batch_dim is not None]
    lo, hi = span
    outside = any(s.offset < lo or s.offset + s.size > hi for s in seeds)
    if t is None or outside or (compressed and value_batch_dim is None):
        return em.zeros(shape, dtype)
    j = len(seeds)
    for axis, segment in enumerate(seeds):
        if segment.size != hi - lo:
            start = segment.offset - lo
            t = em.call(torch.ops.aten.slice.Tensor, t, axis, start, start + segment.size)
    rank = em.rank(t) - j
    t = em.permute(t, list(range(j, j + rank)) + list(range(j)))
    groups = [list(g) for g in value_groups] + [list(s.shape) for s in seeds]
    if compressed:
        t = _spread_batch(em, t, groups, len(value_groups), value_batch_dim, seeds)
    else:
        t = em.reshape(t, [d for g in groups for d in g])
    t = em.reshape(_order_groups(em, t, groups, group_order), shape)
    if em.dtype_of(t) != dtype:
        t = em.call(torch.ops.aten._to_copy.default, t, dtype=dtype)
    return t


def _spread_batch(
    em: Emitter, t: fx.Node, groups: list[list[int]], n_value: int, value_batch_dim: int,
    seeds: Sequence[Segment],
) -> fx.Node:
    """Insert each compressed seed's batch dim, nonzero on the value's batch diagonal.

    Each insertion is one ``diag_embed`` of the value's batch dim: it writes the compact
    entries into zeros, where multiplying by a broadcast identity would visit every entry
    of the (much larger) dense block.
    """
    without = groups[:n_value] + [list(s.sub_shape) for s in seeds]
    t = em.reshape(t, [d for g in without for d in g])
    start = sum(len(g) for g in groups[:n_value])
    for segment, group in zip(seeds, groups[n_value:], strict=True):
        if segment.batch_dim is not None:
            t = em.call(torch.ops.aten.movedim.int, t, value_batch_dim, -1)
            t = em.call(
                torch.ops.aten.diag_embed.default, t, 0, value_batch_dim,
                start + segment.batch_dim,
            )
        start += len(group)
    return t


def _order_groups(
    em: Emitter, t: fx.Node, groups: list[list[int]], group_order: Sequence[int]
) -> fx.Node:
    starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    dims = [starts[g] + d for g in group_order for d in range(len(groups[g]))]
    return em.permute(t, dims)


def unflattener(spec: TreeSpec) -> Callable[[Sequence[object]], object]:
    """``tree_unflatten(leaves, spec)``, as one generated tuple expression when ``spec`` is
    made of tuples alone (tuple ``argnums``, the usual case): 27 blocks of an order-3
    derivative over three inputs took 8.8 us through ``tree_unflatten``."""

    def expression(node: TreeSpec, leaf: Iterator[int]) -> str | None:
        if node.is_leaf():
            return f"leaves[{next(leaf)}]"
        if node.type is not tuple:
            return None
        parts = [expression(child, leaf) for child in node.children()]
        if any(p is None for p in parts):
            return None
        return "(" + "".join(f"{p}, " for p in parts) + ")"

    try:
        body = expression(spec, itertools.count())
        if body is not None:
            return eval(f"lambda leaves: {body}")  # made above of indices and brackets only
    except (SyntaxError, RecursionError):  # nested deeper than Python's parser allows
        pass
    return lambda leaves: tree_unflatten(leaves, spec)


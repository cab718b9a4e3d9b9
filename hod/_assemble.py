"""Assemble stage: seed-space derivative tensors become the blocks torch.func returns.

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
from ._per_example import per_example_block
from ._records import MIXED, ArgLayout, BlockKey, Derived, Mode, Request, SeedPlan, Segment


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


def structure(
    out_spec: TreeSpec, n_out: int, argnums: int | tuple[int, ...],
    layouts: dict[int, ArgLayout], orders: range,
) -> tuple[list[BlockKey], list[TreeSpec]]:
    """The blocks of each order in ``orders``, one after another, and each order's spec."""
    keys, specs = [], []
    for order in orders:
        order_keys, spec = block_structure(out_spec, n_out, argnums, layouts, order)
        keys += order_keys
        specs.append(spec)
    return keys, specs


def result_spec(specs: list[TreeSpec], request: Request, aux_spec: TreeSpec | None) -> TreeSpec:
    """The spec of what the transformed function returns: the blocks of each order
    (nested per ``specs``), as a tuple over the orders for ``derivatives()``, paired with
    the aux output for ``has_aux``."""
    trees = []
    for spec in specs:
        trees.append(tree_unflatten([_Leaf()] * spec.num_leaves, spec))
    tree = tuple(trees) if request.with_values else trees[0]
    if request.has_aux:
        tree = (tree, tree_unflatten([_Leaf()] * aux_spec.num_leaves, aux_spec))
    return tree_flatten(tree)[1]


class _Leaf:
    """A placeholder leaf used to build the result's tree spec."""


def block(em: Emitter, key: BlockKey, derived: Derived, *, compact: int | None = None) -> fx.Node:
    """The tensor of one result block (see :func:`extract_block`).

    Its dtype is that of the first input it differentiates by, as in torch.func (the
    reverse-mode Jacobian takes its input's dtype). With ``compact``, a compressed leaf
    that leads a reverse-last block keeps its other slots compressed: they take its
    within-row shape, and the block holds only the entries on one row of the leaf.
    """
    out_jets, seeds, mode = derived.out_jets, derived.seeds, derived.mode
    if not key.leaves:
        return out_jets[key.out].primal
    y = derived.out_vals[key.out]
    segments = seeds.segments
    # Per example (seeds.rows): y's leading dim holds the examples, each leaf one of them.
    shape = list(y.shape) + [
        d for leaf in key.leaves
        for d in (segments[leaf].sub_shape if seeds.rows else segments[leaf].shape)
    ]
    dtype = derived.leaf_dtypes[key.leaves[0]]
    per_example = _per_example_source(mode, key, seeds)
    if per_example is not None:
        source, x = per_example
        jet = out_jets[source]
        return per_example_block(
            em, jet.d(1), jet.span or (0, seeds.size), x=segments[x],
            x_first=key.leaves[0] == x, shape=shape, dtype=dtype,
        )
    if mode is Mode.FORWARD:
        source, seeded, order = key.out, list(key.leaves), list(range(len(key.leaves) + 1))
        value_groups = [list(y.shape)]
    else:
        m = y.numel() // y.shape[0] if seeds.rows else y.numel()
        lead, source, seeded, value_groups, order = _reverse_layout(
            key, segments, m, seeds.lead_last)
    seeded_segments = [segments[s] for s in seeded]
    if mode is not Mode.FORWARD and compact is not None and compact in seeded:
        # Compact: the lead's rows stand for the compressed leaf's other slots too.
        seeded_segments = [Segment(g.offset, g.sub_shape) if s == compact else g
                           for s, g in zip(seeded, seeded_segments, strict=True)]
        shape = list(y.shape) + [
            d for i, leaf in enumerate(key.leaves)
            for d in (segments[leaf].sub_shape if leaf == compact and i != lead
                      else segments[leaf].shape)
        ]
    state = None
    if seeds.rows or any(s.batch_dim is not None for s in seeded_segments):
        state = seeds.out_states[source]
        assert state != MIXED, "the planner only compresses seeds for tracked outputs"
    jet = out_jets[source]
    return extract_block(
        em, jet.d(len(seeded)), jet.span or (0, seeds.size), value_groups=value_groups,
        value_batch_dim=state, seeds=seeded_segments, group_order=order, shape=shape,
        dtype=dtype, per_row=seeds.rows,
    )


def _reverse_layout(
    key: BlockKey, segments: Sequence[Segment], m: int, lead_last: bool
) -> tuple[int, int, list[int], list[list[int]], list[int]]:
    """Where a reverse-last block is read: its lead leaf's index in ``key.leaves``, the
    output holding that leaf's gradient, the leaves seeding it, the groups of the
    gradient's value dims and the order of the block's dim groups.

    Output ``1 + l`` is the gradient w.r.t. leaf ``l``, of shape ``x_l.shape``, or
    ``(m,) + x_l.shape`` for an output of ``m > 1`` elements (per example, when the call
    holds examples); by symmetry any leaf of the block can lead, seeded by the others.
    """
    lead = _lead(key, segments, lead_last)
    source = 1 + key.leaves[lead]
    seeded = [leaf for i, leaf in enumerate(key.leaves) if i != lead]
    value_groups = [list(segments[key.leaves[lead]].shape)]
    if m > 1:
        value_groups.insert(0, [m])
    first = len(value_groups)  # the first seed group
    order = [first - 1 if i == lead else first + i - (i > lead) for i in range(len(key.leaves))]
    if m > 1:
        order.insert(0, 0)
    return lead, source, seeded, value_groups, order


def _lead(key: BlockKey, segments: Sequence[Segment], lead_last: bool) -> int:
    """Which leaf of a reverse-last block to read the block from: a compressed one (its
    gradient is tracked), else the one whose segment comes first (last with
    ``lead_last``, see :mod:`hod._row_blocks`)."""
    sign = -1 if lead_last else 1
    return min(
        range(len(key.leaves)),
        key=lambda i: (segments[key.leaves[i]].batch_dim is None,
                       sign * segments[key.leaves[i]].offset),
    )


def _per_example_source(mode: Mode, key: BlockKey, seeds: SeedPlan) -> tuple[int, int] | None:
    """For a reverse-last block of a compressed leaf and a weight with per-example terms:
    the output holding those terms and the compressed leaf."""
    if mode is Mode.FORWARD or len(key.leaves) != 2 or not seeds.per_example:
        return None
    segments = seeds.segments
    compressed = [leaf for leaf in key.leaves if segments[leaf].batch_dim is not None]
    weights = [leaf for leaf in key.leaves if leaf in seeds.per_example]
    if len(compressed) != 1 or len(weights) != 1:
        return None
    return 1 + len(segments) + seeds.per_example.index(weights[0]), compressed[0]


def extract_block(
    em: Emitter,
    t: Operand,
    span: tuple[int, int],
    *,
    value_groups: Sequence[Sequence[int]],
    value_batch_dim: int | None,
    seeds: Sequence[Segment],
    group_order: Sequence[int],
    shape: Sequence[int],
    dtype: torch.dtype,
    per_row: bool = False,
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

    ``per_row``: the value's batch dim holds independent examples; compressed seeds keep
    their within-row shape and the batch dim goes first, so the block holds each
    example's own derivatives, ``(B,) + ...``, instead of spreading them.
    """
    compressed = [s for s in seeds if s.batch_dim is not None]
    lo, hi = span
    outside = any(s.offset + s.size <= lo or s.offset >= hi for s in seeds)
    if t is None or outside or (compressed and value_batch_dim is None):
        return em.zeros(shape, dtype)
    j = len(seeds)
    for axis, segment in enumerate(seeds):
        t = _over_segment(em, t, axis, (lo, hi), segment)
    rank = em.rank(t) - j
    t = em.permute(t, list(range(j, j + rank)) + list(range(j)))
    if per_row:
        groups = [list(g) for g in value_groups] + [list(s.sub_shape) for s in seeds]
        t = em.reshape(t, [d for g in groups for d in g])
        t = _order_groups(em, t, groups, group_order)
        t = em.call(torch.ops.aten.movedim.int, t,
                    _ordered_position(groups, group_order, value_batch_dim), 0)
        return _as_block(em, t, shape, dtype)
    groups = [list(g) for g in value_groups] + [list(s.shape) for s in seeds]
    if compressed:
        t = _spread_batch(em, t, groups, len(value_groups), value_batch_dim, seeds)
    else:
        t = em.reshape(t, [d for g in groups for d in g])
    return _as_block(em, _order_groups(em, t, groups, group_order), shape, dtype)


def _over_segment(em: Emitter, t: fx.Node, axis: int, span: tuple[int, int],
                  segment: Segment) -> fx.Node:
    """Seed axis ``axis`` of ``t``, over ``span``, narrowed to ``segment``'s seeds; zeros
    where the span does not reach (a slice of a leaf keeps only its own seeds)."""
    lo, hi = span
    first, last = segment.offset, segment.offset + segment.size
    start, stop = max(first, lo) - lo, min(last, hi) - lo
    if (start, stop) != (0, hi - lo):
        t = em.call(torch.ops.aten.slice.Tensor, t, axis, start, stop)
    before, after = max(0, lo - first), max(0, last - hi)
    if before or after:
        pad = [0, 0] * (em.rank(t) - 1 - axis) + [before, after]
        t = em.call(torch.ops.aten.constant_pad_nd.default, t, pad, 0.0)
    return t


def _as_block(em: Emitter, t: fx.Node, shape: Sequence[int], dtype: torch.dtype) -> fx.Node:
    t = em.reshape(t, shape)
    if em.dtype_of(t) != dtype:
        t = em.call(torch.ops.aten._to_copy.default, t, dtype=dtype)
    return t


def _ordered_position(groups: list[list[int]], group_order: Sequence[int], dim: int) -> int:
    """Where dim ``dim`` of the groups laid out in order lands once they are reordered."""
    starts = _group_starts(groups)
    position = 0
    for g in group_order:
        if starts[g] <= dim < starts[g] + len(groups[g]):
            return position + dim - starts[g]
        position += len(groups[g])
    raise AssertionError(f"dim {dim} is in no group")


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
    starts = _group_starts(groups)
    dims = [starts[g] + d for g in group_order for d in range(len(groups[g]))]
    return em.permute(t, dims)


def _group_starts(groups: list[list[int]]) -> list[int]:
    """The first dim of each group, the groups laid out one after another."""
    return [sum(len(g) for g in groups[:i]) for i in range(len(groups))]


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


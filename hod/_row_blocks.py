"""Plan stage: a reverse-last Hessian read by its later leaves' gradients.

A reverse-last block ``(l1, l2)`` can be read from either leaf's gradient, seeded by the
other. Seeding a leaf costs a tangent from where it enters ``f`` on; reading a leaf's
gradient costs the backward sweep from the output down to where it enters. A network's
parameters enter one layer after another, so the first layer's gradient is the deepest
sweep, and its weights' seeds the longest tangents: the cheap way round pairs a deep
leaf's few seeds with the shallow leaves' gradients (a small CNN's conv weights, 40
seeds, against its 1,450 linear-layer weights). The planner prices both ways with
:func:`~hod._cost.derivative_work` and keeps the cheaper; read *last-leads*, every
gradient needs the seeds up to the end of its own segment only.

A flat parameter vector split into a model's weights is one leaf; its gradient is the
concatenation of the pieces' gradients (``cat`` along dim 0). At order 2 those pieces become
outputs of their own (:func:`with_row_blocks`), each needing the seeds up to its own end,
and the leaf's gradient derivative is completed by symmetry (:func:`completed`): the rows
of piece ``i`` past its end are the transposed rows of the later pieces' derivatives.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import fx

from ._emitter import Emitter
from ._records import Jet, Pieces, SeedPlan

aten = torch.ops.aten


def with_row_blocks(
    gm: fx.GraphModule, seeds: SeedPlan, order: int
) -> tuple[fx.GraphModule, SeedPlan] | None:
    """The last-leads plan of a reverse-last graph ``[y, gradients..., aux...]``: at order 2
    a copy of ``gm`` that also returns, after the gradients, the pieces of every gradient
    that is a concatenation along dim 0 (see the module docstring). None where the plan
    compresses a leaf or reads per-example terms (their blocks are read their own way)."""
    if seeds.rows or seeds.per_example or any(s.batch_dim is not None for s in seeds.segments):
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = list(output.args[0])
    pieced = [] if order != 2 else [
        (leaf, outs[1 + leaf].args[0]) for leaf in range(len(seeds.segments))
        if _concatenated(outs[1 + leaf])
    ]
    plan = replace(seeds, lead_last=True, pieces=tuple(
        Pieces(leaf, tuple(p.meta["val"].numel() for p in parts)) for leaf, parts in pieced
    ))
    if not pieced:
        return gm, plan
    graph, copies = fx.Graph(), {}
    copied = list(graph.graph_copy(gm.graph, copies))
    copy = fx.GraphModule(gm, graph)
    parts = [copies[p] for _, nodes in pieced for p in nodes]
    n_grads = len(seeds.segments)
    graph.output(copied[: 1 + n_grads] + parts + copied[1 + n_grads:])
    copy.recompile()
    return copy, plan


def _concatenated(node: object) -> bool:
    """Whether a gradient is a concatenation of two or more pieces along its dim 0."""
    if not isinstance(node, fx.Node) or node.target is not aten.cat.default:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = node.args[0]
    return dim == 0 and len(parts) > 1 and all(isinstance(p, fx.Node) for p in parts)


def completed(em: Emitter, out_jets: Sequence[Jet], seeds: SeedPlan) -> list[Jet]:
    """``out_jets`` with each pieced leaf's gradient jet completed from its pieces' jets,
    which follow the gradients among the outputs and are dropped.

    Piece ``c`` of a leaf at seeds ``[L, L + n)`` holds the leaf's entries ``[o_c, e_c)``,
    and its jet ``D_c`` covers the seeds up to ``L + e_c``. The completed jet covers
    ``[0, L + n)``, assembled in row bands (one copy, which the planned code writes in
    place): the seeds before the leaf, ``D_c`` for every ``c``; then per piece ``r`` the
    block ``D_c`` at ``r``'s seeds for ``c >= r``, and for ``c < r`` (by the Hessian's
    symmetry) ``D_r`` at ``c``'s seeds, transposed.
    """
    n_grads = len(seeds.segments)
    jets = list(out_jets)
    first = 1 + n_grads
    for pieces in seeds.pieces:
        segment = seeds.segments[pieces.leaf]
        parts = jets[first: first + len(pieces.sizes)]
        first += len(pieces.sizes)
        end = segment.offset + segment.size
        whole = _assembled(em, parts, pieces.sizes, segment.offset, seeds.size)
        derivative = em.reshape(whole, [end, *segment.shape])
        jets[1 + pieces.leaf] = Jet(jets[1 + pieces.leaf].primal, [derivative], (0, end))
    return jets[: 1 + n_grads] + jets[first:]


def _assembled(
    em: Emitter, parts: Sequence[Jet], sizes: Sequence[int], offset: int, total: int
) -> fx.Node:
    """The completed ``(offset + n, n)`` derivative of a leaf at seeds ``[offset, offset + n)``
    of ``total`` from its pieces' jets, one ``cat`` of row bands (see :func:`completed`)."""
    ends = [offset + e for e in itertools.accumulate(sizes)]
    starts = [offset, *ends[:-1]]

    def block(r: int, c: int) -> fx.Node:
        if c >= r:
            return _rows(em, parts[c], sizes[c], (starts[r], ends[r]), total)
        return em.permute(_rows(em, parts[r], sizes[r], (starts[c], ends[c]), total), [1, 0])

    bands = [em.call(aten.cat.default, [block(r, c) for c in range(len(sizes))], 1)
             for r in range(len(sizes))]
    if offset:
        before = [_rows(em, part, size, (0, offset), total)
                  for part, size in zip(parts, sizes, strict=True)]
        bands.insert(0, em.call(aten.cat.default, before, 1))
    return em.call(aten.cat.default, bands, 0)


def _rows(em: Emitter, jet: Jet, size: int, rows: tuple[int, int], total: int) -> fx.Node:
    """Rows ``[lo, hi)`` of a piece's first derivative, flat: ``(hi - lo, size)``, zero
    where its span (without one: all ``total`` seeds) does not reach."""
    lo, hi = rows
    own = jet.span or (0, total)
    d = jet.d(1)
    inner = (max(own[0], lo), min(own[1], hi))
    if d is None or inner[0] >= inner[1]:
        return em.zeros([hi - lo, size], em.dtype_of(jet.primal))
    flat = em.reshape(d, [own[1] - own[0], size])
    if inner != own:
        flat = em.call(aten.slice.Tensor, flat, 0, inner[0] - own[0], inner[1] - own[0])
    if inner != (lo, hi):
        flat = em.call(aten.constant_pad_nd.default, flat, [0, 0, inner[0] - lo, hi - inner[1]])
    return flat

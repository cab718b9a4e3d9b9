"""Plan stage: the planner's cost model, the work of deriving a graph over a seed plan.

Deriving a node to order ``k`` costs, for each input that carries derivatives, one term
over that input's part of the node's seed span (width ``w``): ``w^j`` times the node's
size for ``j = 1..k``, and for a matrix product its contraction size more per entry,
unless the input is an uncompressed input leaf, whose identity seed the rules place
rather than multiply (a compressed leaf's seed is no identity). A product of two inputs
with derivatives adds its Leibniz cross terms, placed when one factor is an identity
seed, else dense and slower still (:data:`INTERLEAVED`). Each node's span is the one
:func:`~hod._derive.derive` gives it: the hull of its inputs' spans, within the seeds the
outputs need from it. Only comparisons between plans of one graph matter.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from ._analysis import covered_span, needed_spans
from ._records import Span

aten = torch.ops.aten

_VIEWS = {aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default,
          aten.reshape.default, aten.expand.default, aten.unsqueeze.default}

#: Products and where their contraction size is: (operand index, dim).
_CONTRACTIONS = {
    aten.mm.default: (0, -1), aten.bmm.default: (0, -1), aten.matmul.default: (0, -1),
    aten.addmm.default: (1, -1),
}
#: A matrix product of two derivatives over different seed axes comes out with its seed
#: axes interleaved with its value dims, and every later elementwise op reads it with
#: strides: measured 2-4x slower per entry than on a row-major result.
INTERLEAVED = 3
#: Ops with Leibniz cross terms between two inputs' derivatives.
_BILINEAR = {*_CONTRACTIONS, aten.mul.Tensor}


def derivative_work(
    gm: fx.GraphModule, seed_spans: dict[int, Span], needs: Sequence[Span | None], order: int,
    identity_seeded: frozenset[int] = frozenset(),
) -> float:
    """Estimated work of deriving ``gm`` to ``order``; ``seed_spans`` maps placeholder
    index -> the seeds of that input, ``needs[i]`` the seeds output ``i`` must cover, and
    ``identity_seeded`` holds the placeholder indices seeded by an identity (uncompressed)."""
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    needed = needed_spans(outputs, needs)
    spans: dict[fx.Node, Span | None] = {}
    placed: set[fx.Node] = set()
    work = 0.0
    index = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spans[node] = seed_spans.get(index)
            if index in identity_seeded:
                placed.add(node)
            index += 1
        elif node.op == "call_function" and node.target is operator.getitem:
            spans[node] = spans.get(node.args[0])
        elif node.op == "call_function":
            spans[node] = _span(node, spans, needed.get(node))
            if spans[node] is not None:
                work += _work(node, spans, placed, order)
    return work


def _span(node: fx.Node, spans: dict, need: Span | None) -> Span | None:
    inputs = [spans[a] for a in node.all_input_nodes if spans.get(a) is not None]
    return covered_span(inputs, need) if inputs and need is not None else None


def _work(node: fx.Node, spans: dict, placed: set[fx.Node], order: int) -> float:
    """One term per input with derivatives, over that input's part of the node's span,
    and for a product of two such inputs the Leibniz cross terms ``D^j a * D^(m-j) b``;
    a matrix product's term costs its contraction size per entry, except where one factor
    is an input's identity seed, which :mod:`hod.rules.linalg` places instead of
    multiplying."""
    lo, hi = spans[node]
    size = _value_size(node)
    contraction = _contraction(node)
    carrying = []
    for arg in node.all_input_nodes:
        span = spans.get(arg)
        if span is not None:
            width = max(0, min(hi, span[1]) - max(lo, span[0]))
            root = _through_views(arg)
            carrying.append((width, root in placed, root.op == "placeholder"))
    work = 0.0
    for width, identity, _ in carrying:
        per_entry = 1 if identity else contraction
        work += size * per_entry * sum(width**j for j in range(1, order + 1))
    if node.target in _BILINEAR and len(carrying) == 2:
        (wa, ida, leaf_a), (wb, idb, leaf_b) = carrying
        for m in range(2, order + 1):
            for j in range(1, m):  # an input leaf's derivatives past the first are zero
                if (leaf_a and j > 1) or (leaf_b and m - j > 1):
                    continue
                placed_term = (ida and j == 1) or (idb and m - j == 1)
                per_entry = 1 if placed_term or contraction == 1 else contraction * INTERLEAVED
                work += size * per_entry * wa**j * wb ** (m - j)
    return work


def _through_views(node: fx.Node) -> fx.Node:
    """``node`` followed back through views to the node they view (itself if none)."""
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _value_size(node: fx.Node) -> int:
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else [val]
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor))


def _contraction(node: fx.Node) -> int:
    where = _CONTRACTIONS.get(node.target)
    if where is None or not isinstance(node.args[where[0]], fx.Node):
        return 1
    return node.args[where[0]].meta["val"].shape[where[1]]

"""The planner's cost model: the work of deriving a graph over a seed plan.

Deriving a node over a span of ``w`` seeds to order ``k`` makes derivative tensors of
``w^j`` times the node's size for ``j = 1..k``; each entry of a matrix product's costs
its contraction size. :func:`derivative_work` sums that over the nodes, each over
the span :func:`~hod._derive.derive` gives it: the hull of its inputs' spans, within the
seeds the outputs need from it. Only comparisons between plans of one graph matter.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from ._derive import covered_span, needed_spans
from ._jet import Span

aten = torch.ops.aten

#: Products and where their contraction size is: (operand index, dim).
_CONTRACTIONS = {
    aten.mm.default: (0, -1), aten.bmm.default: (0, -1), aten.matmul.default: (0, -1),
    aten.addmm.default: (1, -1),
}


def derivative_work(
    gm: fx.GraphModule, seed_spans: dict[int, Span], needs: Sequence[Span | None], order: int
) -> float:
    """Estimated work of deriving ``gm`` to ``order``; ``seed_spans`` maps placeholder
    index -> the seeds of that input, ``needs[i]`` the seeds output ``i`` must cover."""
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    needed = needed_spans(outputs, needs)
    spans: dict[fx.Node, Span | None] = {}
    work = 0.0
    index = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spans[node] = seed_spans.get(index)
            index += 1
        elif node.op == "call_function" and node.target is operator.getitem:
            spans[node] = spans.get(node.args[0])
        elif node.op == "call_function":
            spans[node] = _span(node, spans, needed.get(node))
            if spans[node] is not None:
                width = spans[node][1] - spans[node][0]
                work += _size(node) * sum(width**j for j in range(1, order + 1))
    return work


def _span(node: fx.Node, spans: dict, need: Span | None) -> Span | None:
    inputs = [spans[a] for a in node.all_input_nodes if spans.get(a) is not None]
    return covered_span(inputs, need) if inputs and need is not None else None


def _size(node: fx.Node) -> int:
    """The node's value size, times the contraction size for a matrix product."""
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else [val]
    size = sum(v.numel() for v in values if isinstance(v, torch.Tensor))
    contraction = _CONTRACTIONS.get(node.target)
    if contraction is not None:
        operand = node.args[contraction[0]]
        if isinstance(operand, fx.Node):
            size *= operand.meta["val"].shape[contraction[1]]
    return size

"""The planner's cost model: the work of deriving a graph over a seed plan.

Deriving a node to order ``k`` costs, for each input that carries derivatives, one term
over that input's part of the node's seed span (width ``w``): ``w^j`` times the node's
size for ``j = 1..k``, and for a matrix product its contraction size more per entry,
unless the input is a seeded input leaf, whose identity seed the rules place rather
than multiply. Each node's span is the one :func:`~hod._derive.derive` gives it: the
hull of its inputs' spans, within the seeds the outputs need from it. Only comparisons
between plans of one graph matter.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from ._derive import covered_span, needed_spans
from ._jet import Span

aten = torch.ops.aten

_VIEWS = {aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default,
          aten.reshape.default, aten.expand.default, aten.unsqueeze.default}

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
                work += _work(node, spans, order)
    return work


def _span(node: fx.Node, spans: dict, need: Span | None) -> Span | None:
    inputs = [spans[a] for a in node.all_input_nodes if spans.get(a) is not None]
    return covered_span(inputs, need) if inputs and need is not None else None


def _work(node: fx.Node, spans: dict, order: int) -> float:
    """One term per input with derivatives, over that input's part of the node's span; a
    product's term costs its contraction size per entry, except for an input's own seeds,
    which :mod:`hod.rules.linalg` places instead of multiplying."""
    lo, hi = spans[node]
    size = _value_size(node)
    contraction = _contraction(node)
    work = 0.0
    for arg in node.all_input_nodes:
        span = spans.get(arg)
        if span is None:
            continue
        width = max(0, min(hi, span[1]) - max(lo, span[0]))
        per_entry = 1 if _is_seeded_input(arg) else contraction
        work += size * per_entry * sum(width**j for j in range(1, order + 1))
    return work


def _is_seeded_input(node: fx.Node) -> bool:
    """An input leaf, or a view of one: its derivative is its identity seed."""
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node.op == "placeholder"


def _value_size(node: fx.Node) -> int:
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else [val]
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor))


def _contraction(node: fx.Node) -> int:
    where = _CONTRACTIONS.get(node.target)
    if where is None or not isinstance(node.args[where[0]], fx.Node):
        return 1
    return node.args[where[0]].meta["val"].shape[where[1]]

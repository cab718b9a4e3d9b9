"""Analyze stage: which dims of a traced graph stay independent across a batch of inputs.

Given some differentiated inputs and one dim of each (the *batch* dim, all of size B),
:func:`track_batch` finds, for every node, whether slice ``b`` of the node depends
differentiably only on slice ``b`` of those inputs. Such a node is *tracked* at a dim;
a node with no differentiable dependence on them is *free*; anything else is *mixed*.

Derivative blocks across different batch slices of a tracked node are zero, so one
compressed seed per within-slice coordinate gives all the nonzero blocks at once
(DESIGN section 4, "Structure"). The analysis is conservative: an op it does not know
makes its output mixed, which only turns compression off.

:func:`needed_spans` says which seeds each node's derivatives must cover, given the
seeds each output needs; derive and the planner's cost model both read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ._records import FREE, MIXED, Span, State

aten = torch.ops.aten



def track_batch(gm: fx.GraphModule, batch_dims: dict[int, int]) -> list[State]:
    """The state of each output of ``gm``; ``batch_dims`` maps placeholder index -> dim."""
    states = node_states(gm, batch_dims)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [states[n] for n in output.args[0]]


def node_states(gm: fx.GraphModule, batch_dims: dict[int, int]) -> dict[fx.Node, State]:
    """The state of every node of ``gm`` (see :func:`track_batch`)."""
    states: dict[fx.Node, State] = {}
    index = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            states[node] = batch_dims.get(index, FREE)
            index += 1
        elif node.op == "get_attr":
            states[node] = FREE
        elif node.op == "call_function":
            states[node] = _node_state(node, states)
    return states


def _node_state(node: fx.Node, states: dict[fx.Node, State]) -> State:
    inputs = [states[n] for n in node.all_input_nodes]
    if all(s is FREE for s in inputs):
        return FREE
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return MIXED  # a multi-output op: its getitem users inherit this
    if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
        return FREE  # booleans and indices carry no derivative
    op = node.target
    if op in _ZERO_DERIVATIVE:
        return FREE
    if MIXED in inputs:
        return MIXED
    handler = _HANDLERS.get(op)
    if handler is None and isinstance(op, torch._ops.OpOverload):
        if torch.Tag.pointwise in op.tags:
            handler = _pointwise
        elif torch.Tag.reduction in op.tags:
            handler = _reduction
    if handler is None:
        return MIXED
    return handler(node, states)


def _rank(node: object) -> int:
    return node.meta["val"].dim() if isinstance(node, fx.Node) else 0


def _state(value: object, states: dict[fx.Node, State]) -> State:
    return states[value] if isinstance(value, fx.Node) else FREE


def _pointwise(node: fx.Node, states: dict[fx.Node, State]) -> State:
    """Broadcasting elementwise ops: tracked inputs must land on the same output dim."""
    out_rank = _rank(node)
    dims = set()
    for arg in node.all_input_nodes:
        s = states[arg]
        if s is not FREE:
            dims.add(s + out_rank - _rank(arg))
    return dims.pop() if len(dims) == 1 else MIXED


def _arg(node: fx.Node, name: str, position: int, default: object) -> object:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def _reduced(dims: object, rank: int) -> set[int]:
    if dims is None or dims == []:
        return set(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return {d % rank for d in dims} if rank else set()


def _reduction(node: fx.Node, states: dict[fx.Node, State]) -> State:
    """Reductions over ``dim`` (all dims when absent): mixed when the batch dim goes."""
    source = node.args[0]
    s = _state(source, states)
    if any(_state(a, states) is not FREE for a in node.all_input_nodes if a is not source):
        return MIXED
    rank = _rank(source)
    names = [a.name for a in node.target._schema.arguments]
    dims = _arg(node, "dim", names.index("dim"), None) if "dim" in names else None
    keepdim = _arg(node, "keepdim", names.index("keepdim"), False) if "keepdim" in names else False
    reduced = _reduced(dims, rank)
    if s in reduced:
        return MIXED
    return s if keepdim else s - sum(1 for d in reduced if d < s)


def _along_dim(node: fx.Node, states: dict[fx.Node, State]) -> State:
    """Ops acting along one ``dim`` and keeping the shape (softmax, cumsum, ...)."""
    s = states[node.args[0]]
    return MIXED if node.args[1] % max(_rank(node), 1) == s else s


def _matmul_like(batch_rank: int, first: int = 0) -> Callable[[fx.Node, dict], State]:
    """``mm`` (``batch_rank=0``) and ``bmm`` (1) of ``args[first:first+2]``: rows of a and
    columns of b stay tracked."""

    def handler(node: fx.Node, states: dict[fx.Node, State]) -> State:
        a, b = (_state(v, states) for v in node.args[first : first + 2])
        rows, cols = batch_rank, batch_rank + 1
        if a is FREE and b is FREE:
            return FREE
        if a is not FREE and b is not FREE:
            return a if a == b and a < batch_rank else MIXED
        if a is not FREE:
            return a if a < batch_rank or a == rows else MIXED
        return b if b < batch_rank or b == cols else MIXED

    return handler


def _addmm(node: fx.Node, states: dict[fx.Node, State]) -> State:
    bias = _state(node.args[0], states)
    product = _matmul_like(0, first=1)(node, states)
    if bias is FREE or product is MIXED:
        return product
    aligned = bias + 2 - _rank(node.args[0])
    return aligned if product in (FREE, aligned) else MIXED


def _reshape(node: fx.Node, states: dict[fx.Node, State]) -> State:
    """A view keeps the batch dim when the dims before and after it are regrouped only."""
    s = states[node.args[0]]
    before = tuple(node.args[0].meta["val"].shape)
    after = tuple(node.meta["val"].shape)
    lead = math.prod(before[:s])
    for d in range(len(after)):
        if math.prod(after[:d]) == lead and after[d] == before[s]:
            return d
    return MIXED


def _permute(node: fx.Node, states: dict[fx.Node, State]) -> State:
    s = states[node.args[0]]
    rank = _rank(node)
    return [d % rank for d in node.args[1]].index(s)


def _transpose(node: fx.Node, states: dict[fx.Node, State]) -> State:
    s = states[node.args[0]]
    rank = max(_rank(node), 1)
    d0, d1 = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1)
    return d1 if s == d0 else d0 if s == d1 else s


def _expand(node: fx.Node, states: dict[fx.Node, State]) -> State:
    return states[node.args[0]] + _rank(node) - _rank(node.args[0])


def _slice_or_select(node: fx.Node, states: dict[fx.Node, State]) -> State:
    s = states[node.args[0]]
    dim = (node.args[1] if len(node.args) > 1 else 0) % _rank(node.args[0])
    if dim == s:
        return MIXED
    removes = node.target is aten.select.int
    return s - 1 if removes and dim < s else s


def _cat(node: fx.Node, states: dict[fx.Node, State]) -> State:
    parts: Sequence[fx.Node] = node.args[0]
    rank = _rank(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    tracked = {states[p] for p in parts if states[p] is not FREE}
    if len(tracked) != 1 or dim in tracked:
        return MIXED
    return tracked.pop()


_ZERO_DERIVATIVE = {
    aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.detach.default,
}

_HANDLERS: dict[object, Callable[[fx.Node, dict], State]] = {
    aten._softmax.default: _along_dim,
    aten._log_softmax.default: _along_dim,
    aten.cumsum.default: _along_dim,
    aten.mm.default: _matmul_like(0),
    aten.bmm.default: _matmul_like(1),
    aten.addmm.default: _addmm,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.squeeze.dim: _reshape,
    aten.squeeze.dims: _reshape,
    aten.squeeze.default: _reshape,
    aten.unsqueeze.default: _reshape,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice_or_select,
    aten.select.int: _slice_or_select,
    aten.cat.default: _cat,
    aten._to_copy.default: _pointwise,
    aten.alias.default: _pointwise,
}


def needed_spans(
    outputs: Sequence[fx.Node], needs: Sequence[Span | None]
) -> dict[fx.Node, Span]:
    """For each node, the hull of the seed ranges the outputs it feeds need."""
    needed: dict[fx.Node, Span] = {}
    for out, span in zip(outputs, needs, strict=False):
        if span is not None:
            needed[out] = _hull(needed.get(out), span)
    for node in reversed(list(outputs[0].graph.nodes) if outputs else []):
        span = needed.get(node)
        if span is not None:
            for source in node.all_input_nodes:
                needed[source] = _hull(needed.get(source), span)
    return needed


def _hull(a: Span | None, b: Span) -> Span:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def covered_span(spans: Sequence[Span], needed: Span) -> Span | None:
    """The seeds a node's derivatives cover: its inputs' hull, within what is needed."""
    lo = max(min(lo for lo, _ in spans), needed[0])
    hi = min(max(hi for _, hi in spans), needed[1])
    return (lo, hi) if lo < hi else None

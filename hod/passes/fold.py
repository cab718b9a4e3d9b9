"""Numbers multiplying large tensors, moved onto the small tensors those are made from.

The top order is symmetrized as a mean (``t / k!`` and then sums of permutations), and
``t`` is usually a product with a small factor (``D @ W``) or a sum of such products and
placements. ``(D @ W) / 6`` reads and writes every entry of ``D @ W`` once more;
``D @ (W / 6)`` scales 16 numbers. Linear ops (views, padding, placements, sums, matrix
products) carry the factor through, so it is moved down the chain that makes ``t`` to the
smallest tensors it reaches, when every link is read only by the next.
"""

from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten

#: Ops linear in their first argument, every other argument fixed.
_LINEAR_IN_FIRST = frozenset({
    aten.view.default, aten.reshape.default, aten.permute.default, aten.expand.default,
    aten.slice.Tensor, aten.clone.default, aten.diag_embed.default, aten.movedim.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int,
})
#: Ops linear in each of their two tensor arguments.
_BILINEAR = frozenset({aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mul.Tensor})
_SUMS = frozenset({aten.add.Tensor, aten.sub.Tensor})

#: A tensor this many times smaller than the scaled one is scaled directly.
SMALLER = 16

Edit = tuple[fx.Node, int]  # (consumer, position of the argument to scale)


def fold_scalar_factors(graph: fx.Graph) -> None:
    """Rewrite every ``t * c`` (a number ``c``, floating ``t`` read only there) whose
    factor can be carried down to tensors ``SMALLER`` times smaller than ``t``."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.mul.Tensor or node.kwargs:
            continue
        t, c = node.args
        if not isinstance(t, fx.Node) or type(c) not in (int, float):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            continue
        edits = _plan(t, node, 0, val.numel() // SMALLER)
        if not edits or edits == [(node, 0)]:  # nothing smaller than t to scale
            continue
        for consumer, index in edits:
            arg = consumer.args[index]
            with graph.inserting_before(consumer):
                scaled = graph.call_function(aten.mul.Tensor, (arg, c))
            scaled.meta["val"] = arg.meta["val"]
            consumer.update_arg(index, scaled)
        node.replace_all_uses_with(t)
        graph.erase_node(node)


def _plan(node: object, consumer: fx.Node, index: int, limit: int) -> list[Edit] | None:
    """Where to scale so that ``consumer``'s argument ``index`` (``node``) comes out
    scaled; None when the factor cannot be carried to tensors of at most ``limit``
    entries."""
    if not isinstance(node, fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    if node.meta["val"].numel() <= limit:
        return [(consumer, index)]
    if node.op != "call_function" or len(node.users) != 1 or node.kwargs:
        return None
    op, args = node.target, node.args
    if op in _LINEAR_IN_FIRST or (
        op is aten.constant_pad_nd.default and (len(args) < 3 or args[2] == 0)
    ):
        return _plan(args[0], node, 0, limit)
    if op in _BILINEAR and len(args) == 2:
        if args[0] is args[1]:  # a square: scaling its factor scales it twice
            return None
        smaller = sorted((0, 1), key=lambda i: _numel(args[i]))
        for i in smaller:
            edits = _plan(args[i], node, i, limit)
            if edits is not None:
                return edits
        return None
    if op in _SUMS and len(args) == 2:
        parts = [_plan(a, node, i, limit) for i, a in enumerate(args)]
        if None in parts:
            return None
        return parts[0] + parts[1]
    return None


def _numel(value: object) -> float:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else math.inf

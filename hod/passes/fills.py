"""Fills made from a tensor's shape alone, so that the tensor need not be computed.

A backward pass starts from ``ones_like(y)``: traced, ``full_like(y, 1)``, which reads
``y`` for its shape and dtype only, and keeps alive every op that computes ``y``. A
Hessian's code does not return ``y`` (a loss's value: its logs, exponentials, mean), so
``full_like(x, v)`` of a tensor whose shape is known becomes ``full(shape, v)``, and the
graph's dead code goes with ``x``'s chain. Its layout is contiguous: the ops reading a
fill take their values, not its strides.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def fills_from_shapes(graph: fx.Graph, device: torch.device) -> None:
    """Rewrite every ``full_like(x, v)`` (no memory format asked) as ``full(x.shape, v)``
    with ``x``'s dtype on ``device`` (the code's); what no longer has a reader goes with
    :func:`~hod.passes.rewrite`'s dead-code removal."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.full_like.default:
            continue
        source, value = node.args[0], node.args[1]
        like = source.meta.get("val") if isinstance(source, fx.Node) else None
        memory_format = node.kwargs.get("memory_format", torch.preserve_format)
        if not isinstance(like, torch.Tensor) or memory_format not in (
                torch.preserve_format, torch.contiguous_format):
            continue
        dtype = node.kwargs.get("dtype") or like.dtype
        with graph.inserting_before(node):
            fill = graph.call_function(aten.full.default, (list(like.shape), value),
                                       {"dtype": dtype, "device": device})
        fill.meta = dict(node.meta)
        node.replace_all_uses_with(fill)
        graph.erase_node(node)

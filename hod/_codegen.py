"""Stage 5: the emitted graph becomes a GraphModule whose code is a straight line of calls.

ATen overloads are called through ``torch.ops``, which costs about a microsecond more per
call than the matching public ``torch`` function; at the sizes where hod is fastest that
overhead is most of the time, so ops with an exact public twin are called through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from . import _memory

aten = torch.ops.aten

#: ATen overloads and the public functions that compute exactly the same thing.
FAST_TWINS: dict[object, Callable] = {
    aten.mm.default: torch.mm,
    aten.bmm.default: torch.bmm,
    aten.matmul.default: torch.matmul,
    aten.mul.Tensor: torch.mul,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.div.Tensor: torch.div,
    aten.neg.default: torch.neg,
    aten.exp.default: torch.exp,
    aten.log.default: torch.log,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.relu.default: torch.relu,
    aten.sin.default: torch.sin,
    aten.cos.default: torch.cos,
    aten.reciprocal.default: torch.reciprocal,
    aten.where.self: torch.where,
    aten.permute.default: torch.permute,
    aten.view.default: torch.Tensor.view,
    aten.expand.default: torch.Tensor.expand,
    aten._softmax.default: torch._softmax,
    aten._log_softmax.default: torch._log_softmax,
    aten.gt.Scalar: torch.gt,
    aten.le.Scalar: torch.le,
    aten.cat.default: torch.cat,
    aten.constant_pad_nd.default: torch.constant_pad_nd,
    aten.diag_embed.default: torch.diag_embed,
    aten.movedim.int: torch.movedim,
    aten.eye.default: torch.eye,
}


def generate(
    graph: fx.Graph, constants: dict[str, torch.Tensor], device: torch.device,
    plan_memory: bool = True,
) -> tuple[fx.GraphModule, fx.GraphModule | None, _memory.Memory | None]:
    """The GraphModule running ``graph`` (dead code removed, fast callables substituted),
    holding ``constants`` as attributes; on the CPU with ``plan_memory`` also the variant
    writing its large tensors into reused memory, and that memory (see
    :mod:`hod._memory`), or None."""
    _fuse_transposed_mm(graph)
    graph.eliminate_dead_code()
    planned = _memory.plan(graph) if plan_memory and device.type == "cpu" else None
    if planned is None:
        return _finish(graph, constants), None, None
    planned_graph, memory = planned
    memory.captured = list(constants.values())
    return _finish(graph, constants), _finish(planned_graph, constants), memory


def _finish(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FAST_TWINS:
            node.target = FAST_TWINS[node.target]
        elif node.target is aten.sum.dim_IntList and node.args[1]:
            node.target = torch.sum  # an empty dim list is left to aten, which sums all
    return _module(graph, constants)


def _fuse_transposed_mm(graph: fx.Graph) -> None:
    """``mm(x, permute(w, [1, 0]))`` (every backward of a matmul) as ``linear(x, w)``."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.mm.default:
            x, other = node.args
            if (
                isinstance(other, fx.Node) and other.target is aten.permute.default
                and list(other.args[1]) == [1, 0]
            ):
                node.target = torch.nn.functional.linear
                node.args = (x, other.args[0])


def _module(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    root = torch.nn.Module()
    for name, value in constants.items():
        setattr(root, name, value)
    return fx.GraphModule(root, graph)

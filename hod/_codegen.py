"""Stage 5: the emitted graph becomes a GraphModule whose code is a straight line of calls.

ATen overloads are called through ``torch.ops``, which costs about a microsecond more per
call than the matching public ``torch`` function; at the sizes where hod is fastest that
overhead is most of the time, so ops with an exact public twin are called through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from . import _memory
from ._concat import sum_operands
from ._fold import fold_scalar_factors
from ._pairs import permuted_narrow_products, symmetrize_before_products
from ._views import collapse_view_chains

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
    aten.as_strided.default: torch.as_strided,
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
    plan_memory: bool = True, probe: Sequence[torch.Tensor] | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule | None, _memory.Memory | None]:
    """The GraphModule running ``graph`` (dead code removed, fast callables substituted),
    holding ``constants`` as attributes; and a faster variant for plain tensors outside
    autograd and transforms, or None: on the CPU with ``plan_memory`` it writes its large
    tensors into reused memory, returned third (see :mod:`hod._memory`); with ``probe``,
    the call's tensors, its view chains are single calls (see :mod:`hod._views`)."""
    _fuse_transposed_mm(graph)
    graph.eliminate_dead_code()  # the passes below look at who reads what
    fold_scalar_factors(graph)
    symmetrize_before_products(graph)
    permuted_narrow_products(graph)
    _fuse_multiply_add(graph)
    graph.eliminate_dead_code()
    planned = _memory.plan(graph) if plan_memory and device.type == "cpu" else None
    fast, memory = planned if planned is not None else (_memory.copy_graph(graph), None)
    collapsed = probe is not None and collapse_view_chains(
        fast, lambda g: _module(g, constants),
        [*probe, *(memory.tensors() if memory is not None else [])], len(probe),
    )
    if planned is None and not collapsed:
        return _finish(graph, constants), None, None
    fast_constants = _scalars_as_tensors(fast, constants, device)
    return _finish(graph, constants), _finish(fast, fast_constants), memory


#: Binary ops whose number operand may be a 0-dim tensor of the other operand's dtype.
_SCALAR_OPERAND_OPS = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor)


def _scalars_as_tensors(
    graph: fx.Graph, constants: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Numbers multiplying, adding to or dividing float32/float64 tensors read from 0-dim
    tensors of that dtype instead, and ``constants`` with those tensors added.

    ATen wraps a Python number into a new tensor on every call: ``mul(x, 2)`` took 1.96 us
    for a small ``x``, ``mul(x, c)`` with a 0-dim ``c`` 0.94 us. For these two dtypes the
    number is rounded to the tensor's dtype either way, so the bits are the same.
    """
    constants = dict(constants)
    made: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SCALAR_OPERAND_OPS:
            continue
        dtype = node.meta["val"].dtype
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if (
            dtype not in (torch.float32, torch.float64) or len(tensors) != 1
            or tensors[0].meta["val"].dtype != dtype
        ):
            continue
        args = list(node.args)
        for i, a in enumerate(args):
            if type(a) in (int, float):
                key = (float(a), dtype)
                if key not in made:
                    name = f"_number_{len(made)}"
                    constants[name] = torch.tensor(float(a), dtype=dtype, device=device)
                    with graph.inserting_before(node):  # its first reader
                        made[key] = graph.get_attr(name)
                args[i] = made[key]
        node.args = tuple(args)
    return constants


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


def _fuse_multiply_add(graph: fx.Graph) -> None:
    """``a + b * c`` and ``a - b * c``, with ``b * c`` read only there, as one
    ``addcmul``: one pass over memory fewer (measured: 73 us against 48 + 71 us for a
    2.4 MB result). Tensors of one floating dtype only, as ``addcmul`` does not promote."""
    for node in list(graph.nodes):
        found = sum_operands(node)
        if found is None:
            continue
        candidates, value = found
        for a, product in candidates:
            if _fusable_product(product, node) and isinstance(a, fx.Node) and _same_float(a, node):
                node.target = aten.addcmul.default
                node.args = (a, *product.args)
                node.kwargs = {"value": value}
                graph.erase_node(product)
                break


def _fusable_product(product: object, reader: fx.Node) -> bool:
    return (
        isinstance(product, fx.Node) and product.op == "call_function"
        and product.target is aten.mul.Tensor and not product.kwargs
        and list(product.users) == [reader]
        and all(isinstance(f, fx.Node) and _same_float(f, reader) for f in product.args)
    )


def _same_float(node: fx.Node, like: fx.Node) -> bool:
    val, other = node.meta.get("val"), like.meta.get("val")
    return (
        isinstance(val, torch.Tensor) and isinstance(other, torch.Tensor)
        and val.dtype == other.dtype and val.dtype.is_floating_point
    )


def _module(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    root = torch.nn.Module()
    for name, value in constants.items():
        setattr(root, name, value)
    return fx.GraphModule(root, graph)

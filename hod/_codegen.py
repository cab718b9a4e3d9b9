"""Codegen stage: the rewritten graph becomes GraphModules, straight lines of calls.

The graph and its planned variant come from :func:`hod.passes.rewrite`. ATen overloads
are called through ``torch.ops``, which costs about a microsecond more per call than the
matching public ``torch`` function; at the sizes where hod is fastest that overhead is
most of the time, so ops with an exact public twin are called through it (``slice`` as
``narrow``, whose bounds are resolved here from the input's shape). For the same reason
lists of ints are passed as tuples, which the code holds as constants, and the module's
tensors are plain attributes. The planned code then runs below autograd's dispatch keys
where that is safe (see :mod:`hod._below_autograd`).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import fx

from ._emitter import graph_module
from .decompositions.indexing import slice_bounds
from .passes import Rewritten

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
    aten.addcmul.default: torch.addcmul,
    aten.addmm.default: torch.addmm,
    aten.clone.default: torch.clone,
    aten.split_with_sizes.default: torch.split_with_sizes,
    aten.squeeze.dims: torch.squeeze,
    aten.squeeze.dim: torch.squeeze,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.select.int: torch.select,
    aten.transpose.int: torch.transpose,
    aten.t.default: torch.t,
    aten.mul.Scalar: torch.mul,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.sqrt.default: torch.sqrt,
    aten.rsqrt.default: torch.rsqrt,
    aten.abs.default: torch.abs,
    aten.ge.Scalar: torch.ge,
    aten.lt.Scalar: torch.lt,
    aten.ne.Scalar: torch.ne,
    aten.eq.Scalar: torch.eq,
    aten.eq.Tensor: torch.eq,
    aten.div.Scalar: torch.div,
    aten.logical_not.default: torch.logical_not,
    aten.any.dim: torch.any,
    aten.where.ScalarSelf: torch.where,
    aten.mean.dim: torch.mean,
    aten.clamp.default: torch.clamp,
    aten.argmax.default: torch.argmax,
    aten.reshape.default: torch.reshape,
    aten.convolution.default: torch.convolution,
    aten.full.default: torch.full,
    aten.zeros.default: torch.zeros,
    aten.scalar_tensor.default: torch.scalar_tensor,
    aten.arange.start_step: torch.arange,
    # out= forms (see hod.passes.memory): the public function with the same out= argument
    aten.mm.out: torch.mm,
    aten.bmm.out: torch.bmm,
    aten.mv.out: torch.mv,
    aten.matmul.out: torch.matmul,
    aten.mul.out: torch.mul,
    aten.add.out: torch.add,
    aten.sub.out: torch.sub,
    aten.div.out: torch.div,
    aten.addcmul.out: torch.addcmul,
    aten.cat.out: torch.cat,
    aten.where.self_out: torch.where,
    aten.neg.out: torch.neg,
    aten.exp.out: torch.exp,
    aten.log.out: torch.log,
    aten.tanh.out: torch.tanh,
    aten.sigmoid.out: torch.sigmoid,
    aten.sin.out: torch.sin,
    aten.cos.out: torch.cos,
    aten.reciprocal.out: torch.reciprocal,
    aten.sqrt.out: torch.sqrt,
    aten.rsqrt.out: torch.rsqrt,
    aten.pow.Tensor_Scalar_out: torch.pow,
    aten._softmax.out: torch._softmax,
    aten._log_softmax.out: torch._log_softmax,
}


def einsum(
    equation: str, tensors: list[torch.Tensor], *, path: list[int] | None = None
) -> torch.Tensor:
    """``aten.einsum.default`` through torch's binding: :func:`torch.einsum` is a Python
    wrapper that may choose another contraction order (with opt_einsum), and the binding
    would be printed as ``torch.einsum`` in generated code."""
    return torch._C._VariableFunctions.einsum(equation, tensors, path=path)


def generate(
    rewritten: Rewritten, constants: dict[str, torch.Tensor], device: torch.device, *,
    compiling: bool = False,
) -> tuple[fx.GraphModule, fx.GraphModule | None]:
    """The GraphModule running the rewritten graph (fast callables substituted), holding
    ``constants`` as attributes; and the one running its planned variant, or None (see
    :func:`hod.passes.rewrite`), whose numbers are read from 0-dim tensors. Unless the
    module is ``compiling`` (for torch.compile, which looks for its tensors among its
    parameters and buffers), the constants are plain attributes: ``self.c`` then finds a
    registered tensor only in ``Module.__getattr__``, about a microsecond a read."""
    planned = rewritten.planned
    gm = _finish(rewritten.graph, constants, compiling)
    if planned is None:
        return gm, None
    planned_constants = _scalars_as_tensors(planned, constants, device)
    return gm, _finish(planned, planned_constants, compiling)


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


def _finish(
    graph: fx.Graph, constants: dict[str, torch.Tensor], compiling: bool
) -> fx.GraphModule:
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FAST_TWINS:
            node.target = FAST_TWINS[node.target]
        elif node.target is aten.einsum.default and not compiling:  # dynamo skips the binding
            node.target = einsum
        elif node.target in (aten.sum.dim_IntList, aten.sum.IntList_out) and node.args[1]:
            node.target = torch.sum  # an empty dim list is left to aten, which sums all
        elif node.target is aten.slice.Tensor:
            _narrow(node)
        if isinstance(node.target, _BUILTINS):
            node.args = tuple(_constant(a) for a in node.args)
            node.kwargs = {k: _constant(v) for k, v in node.kwargs.items()}
    module = graph_module(graph, constants)
    if not compiling:
        for name in constants:
            if hasattr(module, name):  # the graph reads it
                value = getattr(module, name)
                delattr(module, name)  # from the module's parameters or buffers
                module.__dict__[name] = value
    return module


#: Functions implemented in C++ (torch's bindings, ATen overloads, tensor methods), which
#: take a tuple wherever they take a list of ints.
_BUILTINS = (types.BuiltinFunctionType, types.MethodDescriptorType, torch._ops.OpOverload)


def _constant(arg: object) -> object:
    """A list of ints as a tuple: code builds a list literal on every call (about 50 ns),
    a tuple of constants once."""
    if isinstance(arg, list) and arg and all(type(i) is int for i in arg):
        return tuple(arg)
    return arg


def _narrow(node: fx.Node) -> None:
    """A ``slice.Tensor`` call with step 1 as ``torch.narrow`` (0.6 us less a call), its
    bounds resolved from the input's size as ``slice`` resolves them."""
    x, dim, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1:])
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if node.kwargs or step != 1 or not isinstance(val, torch.Tensor) or not all(
        b is None or type(b) is int for b in (start, end)
    ):
        return
    start, end = slice_bounds(start, end, val.shape[dim])
    node.target = torch.narrow
    node.args = (x, dim, start, end - start)

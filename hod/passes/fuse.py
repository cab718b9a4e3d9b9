"""Products in cheaper forms: an outer product as a broadcast ``mul``, ``mm`` of a
transpose as ``linear``, a product of expanded tensors before its expansion, an integer
power as products, and a sum with a product as ``addcmul``."""

from __future__ import annotations

import math

import torch
from torch import fx

from .._emitter import graph_call
from .concat import sum_operands

aten = torch.ops.aten


def outer_products_as_mul(graph: fx.Graph) -> None:
    """``mm``/``bmm`` contracting one index, ``(m, 1) @ (1, n)``, as a broadcast ``mul``:
    BLAS gives that shape no fast kernel (16896 x 48: 1.3 ms in a GRU's Hessian code,
    where the ``mul`` takes 0.12). An ``mm`` read only through a view splitting ``m``
    and a transpose of the last two dims is computed in that transposed layout: the sums
    that read it (a weight's gradient summed over time steps) are then contiguous."""
    products = (aten.mm.default, aten.bmm.default, aten.matmul.default)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in products and _outer(*node.args):
            node.target = aten.mul.Tensor
            if node.meta["val"].dim() == 2:
                _transposed_outer_product(graph, node)


def _outer(a: object, b: object) -> bool:
    """Matrices (or stacks of them, same float dtype) that meet over one index."""
    return (
        isinstance(a, fx.Node) and isinstance(b, fx.Node) and _same_float(a, b)
        and a.meta["val"].dim() >= 2 and b.meta["val"].dim() >= 2
        and a.meta["val"].shape[-1] == 1
    )


def _transposed_outer_product(graph: fx.Graph, product: fx.Node) -> None:
    """``transpose(view(a * b, lead + (n,)), -1, -2)`` for ``a (m, 1)``, ``b (1, n)`` as
    ``a.view(lead[:-1] + (1, lead[-1])) * b.view((1, ...) + (n, 1))``."""
    view = _only_user(product, aten.view.default)
    transpose = _only_user(view, aten.transpose.int) if view is not None else None
    if transpose is None:
        return
    shape, n = list(view.args[1]), product.meta["val"].shape[1]
    rank = len(shape)
    if rank < 2 or shape[-1] != n or sorted(d % rank for d in transpose.args[1:]) != [
            rank - 2, rank - 1]:
        return
    a, b = product.args
    with graph.inserting_before(transpose):
        left = graph_call(graph, aten.view.default, a, [*shape[:-2], 1, shape[-2]])
        right = graph_call(graph, aten.view.default, b, [*[1] * (rank - 2), n, 1])
        placed = graph_call(graph, aten.mul.Tensor, left, right)
    transpose.replace_all_uses_with(placed)
    for dead in (transpose, view, product):
        graph.erase_node(dead)


def _only_user(node: fx.Node, target: object) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target is target else None


def fuse_transposed_mm(graph: fx.Graph) -> None:
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


#: Elementwise ops that read a broadcast view as well as a tensor of their result's shape.
BROADCASTING = frozenset({aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor,
                          aten.addcmul.default})


def products_before_expands(graph: fx.Graph) -> None:
    """``expand(a, S) * expand(b, S)`` as ``expand(a * b, S)`` when ``a * b`` is smaller
    than ``S`` and only broadcasting elementwise ops read the product. A tangent that does
    not vary along a batch (a linear first layer's, per point of a PINN) is expanded to the
    batch before the products of a high-order rule; their product then runs once, not once
    per point."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.mul.Tensor or node.kwargs:
            continue
        a, b = node.args
        if not (_expanded(a) and _expanded(b) and _same_float(a, b)) or not node.users or \
                any(user.target not in BROADCASTING for user in node.users):
            continue
        full = list(node.meta["val"].shape)
        small = torch.broadcast_shapes(a.args[0].meta["val"].shape, b.args[0].meta["val"].shape)
        if math.prod(small) == math.prod(full):
            continue
        with graph.inserting_before(node):
            product = graph_call(graph, aten.mul.Tensor, a.args[0], b.args[0])
            wide = graph_call(graph, aten.expand.default, product, full)
        node.replace_all_uses_with(wide)
        graph.erase_node(node)


#: Integer exponents of ``pow`` computed by squaring on the CPU: torch's kernel has fast
#: paths for 2 and 3 only (float32, 32K entries: 4 us for ``x ** 3``, 75 us for ``x ** 4``
#: against 7 us for ``(x * x) * (x * x)``).
POWERS_AS_PRODUCTS = range(4, 17)


def integer_powers_as_products(graph: fx.Graph) -> None:
    """``x ** n`` for an integer ``n`` of :data:`POWERS_AS_PRODUCTS` as products of ``x``
    by squaring (a polynomial rule's ``tanh(x) ** 4``); the rounding differs from the
    kernel's by a few units in the last place."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.pow.Tensor_Scalar:
            continue
        base, exponent = node.args
        if not isinstance(exponent, int) or exponent not in POWERS_AS_PRODUCTS or \
                not _same_float(base, node):
            continue
        with graph.inserting_before(node):
            node.replace_all_uses_with(_power(graph, base, exponent))
        graph.erase_node(node)


def _power(graph: fx.Graph, base: fx.Node, exponent: int) -> fx.Node:
    """``base ** exponent`` (``exponent >= 1``) by squaring."""
    if exponent == 1:
        return base
    half = _power(graph, base, exponent // 2)
    square = graph_call(graph, aten.mul.Tensor, half, half)
    return graph_call(graph, aten.mul.Tensor, square, base) if exponent % 2 else square


def _expanded(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is aten.expand.default and isinstance(node.args[0], fx.Node))


def fuse_multiply_add(graph: fx.Graph) -> None:
    """``a + b * c`` and ``a - b * c``, with ``b * c`` read only there, as one
    ``addcmul``: one pass over memory fewer (measured: 73 us against 48 + 71 us for a
    2.4 MB result). Tensors of one floating dtype only, as ``addcmul`` does not promote."""
    for node in list(graph.nodes):
        found = sum_operands(node)
        if found is None:
            continue
        candidates, value = found
        for a, product in candidates:
            if _fusable_product(product, node) and isinstance(a, fx.Node) and a is not product \
                    and _same_float(a, node):
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

"""Concatenations written in place, for the planned code of :mod:`hod.passes.memory`.

Derivatives over seed spans are assembled with ``cat`` along the seed axis (see
``DeriveContext.sum_pieces``), which copies every part once more. In the planned code,
where no autograd or vmap watches the tensors, the parts can be written where the
result will be instead:

* parts that are fresh tensors read only by the ``cat`` are computed with ``out=`` a slice
  of one buffer, which then is the result;
* ``cat(A[:a], A[a:b] + D, A[b:])``, the slices of one fresh ``A`` in order, becomes
  ``A[a:b] += D`` and then ``A``.

A derivative that covers part of the seed space is padded with zeros to be added to one
that covers all of it: ``A + pad(D)`` (or ``A - pad(D)``), with ``A`` fresh and read only
there, becomes ``A[window] += D`` (``-=``), which reads and writes the window alone
instead of zeroing, copying and adding whole tensors.

Some ops have no native ``out=`` form but cheap in-place equivalents (:data:`INTO`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

aten = torch.ops.aten


def _diag_embed_into(x, offset=0, dim1=-2, dim2=-1, *, out):
    out.zero_()
    out.diagonal(offset, dim1, dim2).copy_(x)
    return out


def _constant_pad_into(x, pad, value=0.0, *, out):
    out.fill_(value)
    inner = out
    for i in range(len(pad) // 2):
        dim = out.dim() - 1 - i
        inner = inner.narrow(dim, pad[2 * i], x.shape[dim])
    inner.copy_(x)
    return out


def _clone_into(x, *, memory_format=None, out):
    return out.copy_(x)


def _eye_into(n, *, dtype=None, layout=None, device=None, pin_memory=None, out):
    out.zero_()
    out.diagonal().fill_(1)
    return out


#: ATen ops without a native ``out=`` form, and functions writing their result into ``out``.
INTO: dict[object, Callable] = {
    aten.diag_embed.default: _diag_embed_into,
    aten.constant_pad_nd.default: _constant_pad_into,
    aten.clone.default: _clone_into,
    aten.eye.default: _eye_into,  # a seed identity: fresh pages cost 6x its writes
}


def into_form(node: fx.Node) -> Callable | None:
    """``node``'s :data:`INTO` function, when it has one that applies."""
    if node.target is aten.constant_pad_nd.default and any(p < 0 for p in node.args[1]):
        return None  # negative pads crop
    if node.target is aten.clone.default and not _val(node).is_contiguous():
        return None  # planned memory is contiguous
    return INTO.get(node.target)


#: ``writer(node)``: the op computing ``node`` into a tensor, and that argument's name.
Writer = Callable[[fx.Node], "tuple[Callable, str] | None"]


def concatenate_in_place(graph: fx.Graph, writer: Writer) -> None:
    """Rewrite the seed-axis ``cat`` nodes of ``graph`` as described in the module
    docstring."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if dim != 0 or len(parts) < 2 or len(set(parts)) < len(parts):
            continue
        if not _add_into_base(graph, node, parts):
            _write_parts_into_buffer(graph, node, parts, writer)


def sum_operands(node: fx.Node) -> tuple[list[tuple[object, object]], int] | None:
    """``(orders, sign)`` for ``node = a + b`` (``sign`` 1) or ``a - b`` (-1), without an
    ``alpha``: the ``(kept, other)`` orders of its operands for which ``node`` is
    ``kept + sign * other`` (both for a sum, one for a difference). None for other nodes."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    if node.target is aten.add.Tensor:
        return [node.args, node.args[::-1]], 1
    if node.target is aten.sub.Tensor:
        return [node.args], -1
    return None


def add_padded_in_place(graph: fx.Graph) -> None:
    """Rewrite ``A + pad(D)`` and ``A - pad(D)`` as described in the module docstring."""
    for node in list(graph.nodes):
        found = sum_operands(node)
        if found is None:
            continue
        pairs, sign = found
        op = aten.add.out if sign == 1 else aten.sub.out
        for base, padded in pairs:
            if _pads_into(padded, node) and _fresh(base) and len(base.users) == 1 and (
                _val(base).shape == _val(node).shape and _val(base).dtype == _val(node).dtype
            ):
                _add_into_window(graph, node, op, base, padded)
                break


def _fresh(node: object) -> bool:
    """Whether ``node`` is new memory, or a ``view`` of new memory that nothing else reads."""
    if isinstance(node, fx.Node) and node.target is aten.view.default:
        node = node.args[0] if len(node.args[0].users) == 1 else None
    return isinstance(node, fx.Node) and allocates(node)


def _pads_into(padded: object, node: fx.Node) -> bool:
    """Whether ``padded`` is a zero padding (no cropping) read only by ``node``, of its
    shape and dtype."""
    return (
        isinstance(padded, fx.Node) and padded.target is aten.constant_pad_nd.default
        and len(padded.users) == 1 and all(p >= 0 for p in padded.args[1])
        and (len(padded.args) < 3 or padded.args[2] == 0)
        and _val(padded).shape == _val(node).shape and _val(padded).dtype == _val(node).dtype
    )


def _add_into_window(
    graph: fx.Graph, node: fx.Node, op: Callable, base: fx.Node, padded: fx.Node
) -> None:
    source, pad = padded.args[0], padded.args[1]
    window = base
    with graph.inserting_before(node):
        for i in range(len(pad) // 2):
            dim = _val(base).dim() - 1 - i
            start, stop = pad[2 * i], pad[2 * i] + _val(source).shape[dim]
            if (start, stop) != (0, _val(base).shape[dim]):
                window = graph.call_function(aten.slice.Tensor, (window, dim, start, stop))
                window.meta["val"] = window.args[0].meta["val"].narrow(dim, start, stop - start)
        written = graph.call_function(op, (window, source), {"out": window})
    written.meta["val"] = window.meta["val"]
    node.replace_all_uses_with(base)
    graph.erase_node(node)
    graph.erase_node(padded)


def _add_into_base(graph: fx.Graph, cat: fx.Node, parts: list[fx.Node]) -> bool:
    """``cat(A[:a], A[a:b] + D, ...)`` as ``A[a:b] += D``; False when not of that form."""
    slices, adds = [], []
    for part in parts:
        if _is_slice0(part):
            slices.append(part)
        elif part.target is aten.add.Tensor and len(part.users) == 1 and not part.kwargs:
            inner = [a for a in part.args if _is_slice0(a)]
            if len(inner) != 1 or _val(part).shape != _val(inner[0]).shape:
                return False
            slices.append(inner[0])
            adds.append((part, inner[0]))
        else:
            return False
    base = slices[0].args[0]
    stops = [0] + [s.args[3] for s in slices]
    if (
        not adds or not allocates(base)
        or any(s.args[0] is not base or s.args[2] != stops[i] for i, s in enumerate(slices))
        or stops[-1] != _val(base).shape[0] or _val(base).dtype != _val(cat).dtype
        or any(len(s.users) != 1 for s in slices) or set(base.users) != set(slices)
    ):
        return False
    for add, target in adds:
        add.target = aten.add.out
        add.kwargs = {"out": target}
    cat.replace_all_uses_with(base)
    graph.erase_node(cat)
    return True


def _write_parts_into_buffer(
    graph: fx.Graph, cat: fx.Node, parts: list[fx.Node], writer: Writer
) -> None:
    """Compute every part into its slice of one buffer, when every part allows it."""
    val = _val(cat)
    sources = [_source(p) for p in parts]
    if len(set(sources)) < len(sources) or not all(
        len(p.users) == 1 and allocates(p) and _val(p).dtype == val.dtype for p in sources
    ):
        return
    writers = [writer(p) for p in sources]
    if None in writers:
        return
    first = min(sources, key=list(graph.nodes).index)
    with graph.inserting_before(first):
        buffer = graph.call_function(
            aten.empty.memory_format, (list(val.shape),),
            {"dtype": val.dtype, "device": torch.device("cpu")},
        )
    buffer.meta["val"] = torch.empty(val.shape, dtype=val.dtype, device="meta")
    start = 0
    for part, source, (op, out_name) in zip(parts, sources, writers, strict=True):
        stop = start + _val(part).shape[0]
        with graph.inserting_before(source):
            window = graph.call_function(aten.slice.Tensor, (buffer, 0, start, stop))
            window.meta["val"] = buffer.meta["val"][start:stop]
            if source is not part:  # the part is a view of what the source computes
                shape = list(_val(source).shape)
                window = graph.call_function(aten.view.default, (window, shape))
                window.meta["val"] = window.args[0].meta["val"].view(shape)
        source.target = op
        source.kwargs = {**source.kwargs, out_name: window}
        start = stop
    cat.replace_all_uses_with(buffer)
    graph.erase_node(cat)


def _source(part: fx.Node) -> fx.Node:
    """The node computing ``part``'s elements: through a reshaping ``view`` of a tensor
    read only by it (a view of a contiguous tensor has its element order)."""
    if part.target is aten.view.default and len(part.users) == 1:
        return part.args[0]
    return part


def _is_slice0(node: object) -> bool:
    return (
        isinstance(node, fx.Node) and node.target is aten.slice.Tensor
        and node.args[1] == 0 and len(node.args) == 4
    )


def allocates(node: fx.Node) -> bool:
    """Whether ``node`` is a single-tensor ATen op whose result is new memory: not one
    whose schema says the result aliases an input, nor a view by its shape information
    (anything else may alias its inputs)."""
    op, val = node.target, _val(node)
    return (
        isinstance(op, torch._ops.OpOverload) and isinstance(val, torch.Tensor)
        and not any(r.alias_info is not None for r in op._schema.returns)
        and not val._is_view()
    )


def _val(node: fx.Node):
    return node.meta.get("val")

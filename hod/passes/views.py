"""Chains of view calls in generated code, each as one ``as_strided`` call.

Generated code reshapes a lot: every result block is a slice of a slice, permuted and
viewed; a placement views, permutes and expands before it writes. At the sizes where a
call's dispatch is most of its cost (about a microsecond for a view, as much as a small
product), more than half the calls of an order-3 graph are views. A chain of views from
one tensor is described by the sizes, strides and storage offset at its end, so one
``as_strided`` call can stand for it, when the layout of the tensor at its root is known.

Meta tensors do not promise that layout for every op, and planned memory (see
:mod:`hod.passes.memory`) changes it, so the layouts are observed instead: the graph runs once
on the call's own tensors with every chain end among its results, and the rewritten graph
asks for what came. That is exact on every later call because a root is never memory of
the caller's (an input or a captured tensor, whose storage offsets the caller decides):
it is new memory or planned memory, whose layout depends only on the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import fx

from .concat import allocates

aten = torch.ops.aten

#: ATen ops whose result is a view of their first argument, every other argument fixed.
VIEW_OPS = frozenset({
    aten.view.default, aten.permute.default, aten.slice.Tensor, aten.expand.default,
    aten.movedim.int, aten.unsqueeze.default, aten.squeeze.dim, aten.select.int,
    aten.transpose.int, aten.t.default, aten.diagonal.default, aten.alias.default,
})

#: Graphs whose tensors add up to more bytes than this are left as they are: dispatch is
#: a small part of their time, and observing layouts costs one more run of the graph,
#: which keeps every chain's root alive to its end.
MAX_GRAPH_BYTES = 256 * 2**20


def collapse_view_chains(
    graph: fx.Graph, module: Callable[[fx.Graph], fx.GraphModule],
    args: Sequence[torch.Tensor], n_inputs: int,
) -> bool:
    """Rewrite, in ``graph``, every chain of two or more views whose root is not caller
    memory into one ``as_strided`` call, with the layouts seen when ``module(graph)``
    runs on ``args``, of which the first ``n_inputs`` are the call's tensors. Whether
    anything changed."""
    if _graph_bytes(graph) > MAX_GRAPH_BYTES:
        return False
    ends = _chain_ends(graph, n_inputs)
    if not ends:
        return False
    seen = _observe(graph, module, args, [*ends, *ends.values()])
    changed = False
    for (end, root), tensor, base in zip(ends.items(), seen, seen[len(ends):], strict=False):
        if tensor.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            continue
        with graph.inserting_after(end):
            strided = graph.call_function(
                aten.as_strided.default,
                (root, list(tensor.shape), list(tensor.stride()), tensor.storage_offset()),
            )
        strided.meta.update(end.meta)
        end.replace_all_uses_with(strided)
        changed = True
    for node in reversed(graph.nodes):  # not eliminate_dead_code: in-place writes look dead
        if _is_view(node) and not node.users:
            graph.erase_node(node)
    return changed


def _chain_ends(graph: fx.Graph, n_inputs: int) -> dict[fx.Node, fx.Node]:
    """Views read by something other than a view, two or more views from a root that is
    not caller memory, and that root."""
    external = caller_memory(graph, n_inputs)
    ends: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if not _is_view(node) or all(_is_view(user) for user in node.users):
            continue
        root, depth = node, 0
        while _is_view(root):
            root, depth = root.args[0], depth + 1
        if depth >= 2 and root not in external:
            ends[node] = root
    return ends


def caller_memory(graph: fx.Graph, n_inputs: int) -> set[fx.Node]:
    """Nodes whose result may be memory of the caller's: the first ``n_inputs``
    placeholders, captured tensors, and what may alias them."""
    external: set[fx.Node] = set()
    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if placeholders < n_inputs:
                external.add(node)
            placeholders += 1
        elif node.op == "get_attr":
            external.add(node)
        elif node.op == "call_function":
            written = [node.kwargs[k] for k in _out_names(node) if k in node.kwargs]
            aliased = written or ([] if allocates(node) else node.all_input_nodes)
            if any(a in external for a in aliased):
                external.add(node)
    return external


def _out_names(node: fx.Node) -> list[str]:
    """The names of the arguments ``node`` writes its result into (planned code)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:  # an in-place stand-in of hod.passes.concat.INTO
        return ["out"]
    return [a.name for a in schema.arguments if a.is_out]


def _is_view(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS


def _graph_bytes(graph: fx.Graph) -> int:
    total = 0
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += math.prod(val.shape) * val.dtype.itemsize
    return total


def _observe(
    graph: fx.Graph, module: Callable[[fx.Graph], fx.GraphModule],
    args: Sequence[torch.Tensor], nodes: list[fx.Node],
) -> list[torch.Tensor]:
    """The tensors ``nodes`` hold when ``graph`` runs on ``args``."""
    probe = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "output":
            env[node] = probe.node_copy(node, lambda n: env[n])
    probe.output([env[n] for n in nodes])
    with torch.no_grad():
        return module(probe)(*args)
